"""Megatron-core as a bench peer: megatron-tp and megatron-ddp train megatron-single's curve.

Megatron's GPTModel initialises its weights its own way, so its curves are compared with its own
single-process run (megatron-single), as ours (tp) is with single. The peers come with the optional
`peers` extra; without it the parity test is skipped, and the rows fail in one line while the other
strategies run (tested by hiding the package from the jobs).
"""

import importlib.util
import json
import os

import pytest
from test_bench import bench, clean_env  # noqa: F401 - clean_env is a fixture

INSTALL_HINT = "ConfigError: megatron-core is not installed: pip install -e '.[peers]'"
HAS_MEGATRON = (importlib.util.find_spec("megatron") is not None
                and importlib.util.find_spec("megatron.core") is not None)


@pytest.mark.skipif(not HAS_MEGATRON, reason="no megatron-core (the peers extra)")
def test_megatron_tp_and_ddp_train_megatron_single_curve(clean_env, capsys, tiny_dataset, tmp_path):  # noqa: F811
    # our tp is there for its ratio to megatron-tp (its curve against single: test_bench's tensor-parallel rows)
    names = ["tp", "megatron-single", "megatron-tp", "megatron-ddp"]
    assert bench(tiny_dataset, tmp_path, "--strategies", ",".join(names)) == 0
    by = {r["strategy"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert list(by) == names
    for r in by.values():
        assert not r.get("error"), r
        assert len(r["losses"]) == 2 + 5 and r["step_time_s"] > 0
        assert r["world_size"] == (1 if r["strategy"].endswith("single") else 2)
    # Megatron's tp (vocabulary-parallel embedding and cross-entropy, column/row linears) and its DDP
    # (fp32 gradient buckets, averaged) on the same batches: megatron-single's curve to rounding
    for name in ("megatron-tp", "megatron-ddp"):
        assert by[name]["losses"] == pytest.approx(by["megatron-single"]["losses"], rel=1e-5), name
    assert by["megatron-single"]["losses"][-1] < by["megatron-single"]["losses"][0]
    assert "Megatron-core" in by["megatron-tp"]["note"]
    row = next(line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| tp |"))
    assert "x megatron-tp" in row, row  # our tp next to Megatron's


def test_without_megatron_its_row_fails_in_one_line(clean_env, capsys, tiny_dataset, tmp_path):  # noqa: F811
    """A `megatron` package that fails to import, first on the jobs' path, stands for a missing one."""
    shadow = tmp_path / "shadow" / "megatron"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError('No module named megatron', name='megatron')\n")
    clean_env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "out"
    assert bench(tiny_dataset, out, "--strategies", "megatron-tp,single", "--steps", "1", "--warmup", "0") == 0
    assert "megatron-tp: FAILED" in capsys.readouterr().out
    mg, single = json.loads((out / "results.json").read_text())
    assert mg["strategy"] == "megatron-tp" and mg["error"].endswith(INSTALL_HINT), mg["error"]
    assert "\n" not in mg["error"]
    assert not single.get("error") and len(single["losses"]) == 1


@pytest.mark.skipif(not HAS_MEGATRON, reason="no megatron-core (the peers extra)")
def test_megatron_peers_take_gpt_models_only(clean_env, capsys, tiny_dataset, tmp_path):  # noqa: F811
    assert bench(tiny_dataset, tmp_path, "--strategies", "megatron-single", "--model", "llama-tiny",
                 "--steps", "1", "--warmup", "0") == 0
    (mg,) = json.loads((tmp_path / "results.json").read_text())
    assert mg["error"].endswith("ConfigError: the megatron peers build Megatron's GPTModel: GPT family only, "
                                "not 'llama'"), mg["error"]
