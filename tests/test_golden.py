"""The golden loss-parity suite (meshlm/parity.py): every layout's 30-step curve equals one process's.

The cases run on the test-suite's persistent process pools (the `meshlm parity` command runs the same
cases as torchrun jobs). MESHLM_GOLDEN=long adds the longer sweep. The single-process curve is also
compared with the one kept in tests/assets/golden_curve.json, written by
`MESHLM_GOLDEN_WRITE=1 pytest tests/test_golden.py`, so a change of the mathematics shows up even
when every layout changes with it; that comparison needs the same tokens (the corpus is this Python's
stdlib) and is skipped, saying so, on another one.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from meshlm.parity import GOLDEN, LONG, RTOL, data_fingerprint, loss_curve, max_rel_diff

STEPS = 30
ASSET = Path(__file__).parent / "assets" / "golden_curve.json"
CASES = GOLDEN[1:] + (LONG if os.environ.get("MESHLM_GOLDEN") == "long" else [])


@pytest.fixture(scope="module")
def single(tiny_dataset):
    torch.set_num_threads(1)
    return loss_curve(GOLDEN[0].layout, data_path=str(tiny_dataset.path), steps=STEPS)


def test_single_curve_learns_and_matches_the_kept_one(single, tiny_dataset):
    assert single[-1] < single[0] - 0.5  # it trains
    fingerprint = data_fingerprint(str(tiny_dataset.path))
    if os.environ.get("MESHLM_GOLDEN_WRITE"):
        ASSET.write_text(json.dumps({"data": fingerprint, "steps": STEPS, "losses": single}, indent=1))
    kept = json.loads(ASSET.read_text())
    if kept["data"] != fingerprint:
        pytest.skip(f"the kept curve was made from other tokens (data {kept['data']}, here {fingerprint})")
    assert max_rel_diff(single, kept["losses"]) < 1e-5


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_layout_follows_the_single_process_curve(dist, tiny_dataset, single, case):
    curves = dist(case.world).run(loss_curve, case.layout, data_path=str(tiny_dataset.path), steps=STEPS)
    for curve in curves:
        assert max_rel_diff(curve, single) <= RTOL, case.name


def test_parity_command(capsys, tiny_dataset, tmp_path, monkeypatch):
    """`meshlm parity` runs each case as its own torchrun job, prints the table, writes parity.json."""
    from meshlm.cli import main
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    code = main(["parity", "--only", "tp2", "--steps", "2", "--data", str(tiny_dataset.path), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2/2 layouts within rtol" in out
    rows = json.loads((tmp_path / "parity.json").read_text())["rows"]
    assert [r["case"] for r in rows] == ["single", "tp2"] and all(r["ok"] for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--only", "dp5"], "--only: unknown case 'dp5'; cases are single, dp4,"),
    (["--steps", "0"], "--steps (0) must be >= 1"),
])
def test_parity_bad_input(capsys, argv, message):
    from meshlm.cli import main
    assert main(["parity", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
