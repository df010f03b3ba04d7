"""DeepSpeed ZeRO stages as bench peers: our zero1|2|3 and deepspeed-zero1|2|3 train the same curves.

The peers come with the optional `peers` extra (pip install -e '.[peers]'; CI installs it). Without
it the parity test is skipped, and the rows of the deepspeed strategies fail in one line while the
other strategies run: that is tested either way, by hiding the installed package from the jobs.
"""

import importlib.util
import json
import os

import pytest
from test_bench import bench, clean_env  # noqa: F401 - clean_env is a fixture

from meshlm.config import param_count, preset

STAGES = ("1", "2", "3")
INSTALL_HINT = "ConfigError: deepspeed is not installed: pip install -e '.[peers]'"


@pytest.fixture(scope="module")
def torch_extensions(tmp_path_factory):
    """Where DeepSpeed would compile its C++ ops: a temporary directory here, not the user's
    ~/.cache/torch_extensions. The peer skips the one DeepSpeed builds on every start (its
    inference-only shared-memory all-reduce, up to a minute on 2 cores), so it stays empty."""
    return tmp_path_factory.mktemp("torch-extensions")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="no deepspeed (the peers extra)")
def test_deepspeed_zero_stages_run_our_math(clean_env, capsys, tiny_dataset, tmp_path, torch_extensions):  # noqa: F811
    clean_env.setenv("TORCH_EXTENSIONS_DIR", str(torch_extensions))
    ours = [f"zero{k}" for k in STAGES]
    theirs = [f"deepspeed-zero{k}" for k in STAGES]
    assert bench(tiny_dataset, tmp_path, "--strategies", ",".join(ours + theirs)) == 0
    by = {r["strategy"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert list(by) == ours + theirs
    for r in by.values():
        assert not r.get("error"), r
        assert len(r["losses"]) == 2 + 5 and r["step_time_s"] > 0 and r["world_size"] == 2
    # the same model, optimizer, clipping, data and normalisation: the same loss curve, step by step.
    # Stages 1 and 2 are bit-identical to ours here; stage 3 differs by rounding (about 1e-7 relative,
    # from the first update on: DeepSpeed's own ZeRO-3 gradient and parameter handling).
    for k in STAGES:
        assert by[f"deepspeed-zero{k}"]["losses"] == pytest.approx(by[f"zero{k}"]["losses"], rel=1e-5), k

    # bytes from DeepSpeed's comms logger, in our convention (the full tensor): ZeRO-1/2 all-reduce
    # the gradients (and an 8-byte norm) and all-gather the parameters; ZeRO-3 reduce-scatters the gradients
    psi = param_count(preset("gpt-tiny"), vocab_size=tiny_dataset.vocab_size)["total"]
    for k in ("1", "2"):
        comm = by[f"deepspeed-zero{k}"]["comm_bytes_per_step"]
        assert comm["all_reduce/dp"] == pytest.approx(4 * psi, rel=1e-3) and comm["all_gather/dp"] == 4 * psi, comm
    assert by["deepspeed-zero3"]["comm_bytes_per_step"]["reduce_scatter/dp"] == 4 * psi
    assert by["deepspeed-zero3"]["comm_bytes_per_step"]["all_gather/dp"] > 4 * psi  # forward, and again for backward
    assert "comms logger" in by["deepspeed-zero1"]["note"]

    report = (tmp_path / "report.md").read_text()
    for k in STAGES:  # our zeroK next to DeepSpeed's
        row = next(line for line in report.splitlines() if line.startswith(f"| zero{k} |"))
        assert f"x deepspeed-zero{k}" in row, row
    assert not any(torch_extensions.iterdir())  # nothing compiled: the inference-only op was skipped


def test_without_deepspeed_its_row_fails_in_one_line(clean_env, capsys, tiny_dataset, tmp_path):  # noqa: F811
    """A `deepspeed` package that fails to import, first on the jobs' path, stands for a missing one."""
    shadow = tmp_path / "shadow" / "deepspeed"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError('No module named deepspeed', name='deepspeed')\n")
    clean_env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "out"
    assert bench(tiny_dataset, out, "--strategies", "deepspeed-zero2,single", "--steps", "1", "--warmup", "0") == 0
    assert "deepspeed-zero2: FAILED" in capsys.readouterr().out
    ds, single = json.loads((out / "results.json").read_text())
    assert ds["strategy"] == "deepspeed-zero2" and ds["error"].endswith(INSTALL_HINT), ds["error"]
    assert "\n" not in ds["error"]
    assert not single.get("error") and len(single["losses"]) == 1
    assert f"- `deepspeed-zero2`: {ds['error']}" in (out / "report.md").read_text()
