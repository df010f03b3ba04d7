"""The flight recorder, hang diagnosis (`meshlm doctor`) and straggler detection."""

import json
import os
import subprocess
import sys
import time


from meshlm.cli import main
from meshlm.comm import CommMeter
from meshlm.diagnose import analyze


def tiny_args(tiny_dataset, out_dir, *extra):
    return ["--model", "gpt-tiny", "--data.path", str(tiny_dataset.path), "--train.out_dir", str(out_dir),
            "--train.batch_size", "8", "--train.seq_len", "32", "--train.eval_every", "0",
            "--train.progress", "false", "--train.tensorboard", "false", *extra]


def meshlm(argv, *, fault=None, timeout=120):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MESHLM_FAULT", None)
    if fault:
        env["MESHLM_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "meshlm", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_ring_keeps_sequence_numbers_and_open_entries():
    m = CommMeter()
    a = m.begin("all_reduce", "dp", 16)
    m.end(a)
    b = m.begin("all_reduce", "dp", 16)
    assert (a["seq"], b["seq"]) == (1, 2)
    assert m.open_entries() == [b]
    m.record("p2p", "pp", 8, 0.1)  # completed ones count too
    assert m.stats[("all_reduce", "dp")].calls == 1 and m.stats[("p2p", "pp")].bytes == 8
    off = CommMeter(recording=False)
    off.end(off.begin("all_reduce", "dp", 16))
    assert not off.flight and off.stats[("all_reduce", "dp")].calls == 1


def _dump(rank, ops, seqs, world=4):
    return {"run_id": "x", "rank": rank, "world": world, "layout": {"dp": 2, "tp": 2}, "step": 2, "reason": "t",
            "coords": {"pp": 0, "dp": rank // 2, "ep": 0, "cp": 0, "tp": rank % 2}, "ops": ops, "seqs": seqs}


def test_analyze_names_the_rank_that_never_arrived():
    # rank 2 waits in tp all_reduce #5 with rank 3 (no dump); ranks 0 and 1 wait in dp #3 for 2 and 3
    def open_op(op, axis, seq, ranks, age):
        return {"op": op, "axis": axis, "seq": seq, "ranks": ranks, "start": -age, "end": None}
    dumps = {0: _dump(0, [open_op("all_reduce", "dp", 3, [0, 2], 9)], [{"axis": "dp", "ranks": [0, 2], "seq": 3},
                                                                         {"axis": "tp", "ranks": [0, 1], "seq": 9}]),
             1: _dump(1, [open_op("all_reduce", "dp", 3, [1, 3], 9)], [{"axis": "dp", "ranks": [1, 3], "seq": 3},
                                                                         {"axis": "tp", "ranks": [0, 1], "seq": 9}]),
             2: _dump(2, [open_op("all_reduce", "tp", 5, [2, 3], 10)], [{"axis": "dp", "ranks": [0, 2], "seq": 2},
                                                                          {"axis": "tp", "ranks": [2, 3], "seq": 5}])}
    lines = analyze(dumps)
    assert lines[0] == ("rank 3 (dp 1, tp 1) never entered all_reduce #3 on the dp axis, all_reduce #5 on the tp "
                        "axis (no dump: blocked outside a collective, or dead); ranks 0-2 waited 10 s")
    assert lines[1] == "no dump from ranks 3"


def test_doctor_refuses_empty_and_mixed_folders(tmp_path, capsys):
    assert main(["doctor", str(tmp_path)]) == 2
    assert "no flight-recorder dumps" in capsys.readouterr().err
    (tmp_path / "flight").mkdir()
    for r, rid in ((0, "a"), (1, "b")):
        (tmp_path / "flight" / f"rank{r}.json").write_text(json.dumps({**_dump(r, [], []), "run_id": rid}))
    assert main(["doctor", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dumps of different runs" in err[0]


def test_hung_rank_is_named(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    start = time.monotonic()
    p = meshlm(["train", *tiny_args(tiny_dataset, out, "--layout.dp", "2", "--layout.tp", "2", "--train.steps", "6",
                                    "--train.collective_timeout_s", "8", "--train.threads", "1")],
               fault="hang,rank=3,step=2")
    took = time.monotonic() - start
    assert p.returncode != 0
    line = next(x for x in p.stderr.splitlines() if "collective timed out" in x)
    assert "rank 3 (dp 1, tp 1) never entered all_reduce #" in line and "on the tp axis" in line, line
    assert "no dump from ranks 3" in line
    assert took < 60, took
    assert main(["doctor", str(out)]) == 0
    said = capsys.readouterr().out
    assert "rank 3 (dp 1, tp 1) never entered all_reduce #" in said and "on the tp axis" in said


def test_straggler_is_named(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    p = meshlm(["train", *tiny_args(tiny_dataset, out, "--layout.dp", "2", "--train.steps", "4",
                                    "--train.straggler_every", "2", "--train.threads", "1")],
               fault="slow,rank=1,seconds=0.5")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "straggler rank 1" in p.stdout
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stragglers"] for r in records if "stragglers" in r] == [[1], [1]]
