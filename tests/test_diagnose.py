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
    assert lines[1] == "no dump from rank 3"


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
    assert "no dump from rank 3" in line
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


# --- every collective of meshlm's layers is in the ring, with its axis ------------------------------


def one_step_ring(data_path: str, preset: str, layout: dict, train: dict) -> dict:
    """One training step under `layout`; the ring's operations and the per-group sequence counters."""
    import torch

    from meshlm.data import TokenDataset
    from meshlm.layout import Layout
    from meshlm.mesh import Mesh
    from meshlm.settings import build_config
    from meshlm.train.trainer import Trainer, resolve_vocab

    overrides = {"model.preset": preset, "data.path": data_path, "train.batch_size": 8, "train.seq_len": 32,
                 **{f"layout.{k}": v for k, v in layout.items()}, **{f"train.{k}": v for k, v in train.items()}}
    dataset = TokenDataset.open(data_path)
    cfg = resolve_vocab(build_config(overrides=overrides), dataset)
    trainer = Trainer(cfg, mesh=Mesh.build(Layout(**layout)), device=torch.device("cpu"), dataset=dataset)
    trainer.step()
    state = trainer.meter.flight_state()
    return {"ops": state["ops"], "seqs": {(s["axis"], tuple(s["ranks"] or ())): s["seq"] for s in state["seqs"]}}


def _check_ring(results: list[dict]) -> set[tuple[str, str]]:
    """The (op, axis) pairs seen; every member of a group entered the same number of its operations."""
    for r in results:
        for key, n in r["seqs"].items():
            for peer in key[1]:
                assert results[peer]["seqs"].get(key) == n, (key, n, results[peer]["seqs"].get(key))
    return {(e["op"], e["axis"]) for r in results for e in r["ops"] if e["ranks"]}


def test_ring_holds_every_axis(dist, tiny_dataset):
    """ZeRO-3's reduce-scatters and all-gathers, the expert all-to-alls, the context ring's transfers and the
    gradient-norm all-reduces are entered with their group (so `meshlm doctor` can compare them)."""
    path = str(tiny_dataset.path)
    pool = dist(2)
    seen = _check_ring(pool.run(one_step_ring, path, "gpt-moe-tiny", {"ep": 2, "zero": 3}, {}))
    for want in [("reduce_scatter", "dp"), ("all_gather", "dp"), ("all_to_all", "ep"), ("all_to_all_counts", "ep"),
                 ("all_reduce", "dp"), ("all_reduce", "ep"), ("all_reduce", "data")]:
        assert want in seen, (want, sorted(seen))
    seen = _check_ring(pool.run(one_step_ring, path, "gpt-tiny", {"cp": 2}, {}))
    assert {("send_recv", "cp"), ("all_reduce", "cp")} <= seen, sorted(seen)
    seen = _check_ring(pool.run(one_step_ring, path, "gpt-tiny", {"dp": 2}, {"grad_sync": "ps"}))
    assert {("ps_push", "dp"), ("ps_pull", "dp")} <= seen, sorted(seen)  # the parameter server's


# --- SIGUSR1 -----------------------------------------------------------------------------------------


def signal_while_blocked(out_dir: str) -> dict:
    """Rank 0 blocks in an all-reduce that rank 1 joins only after it has sent rank 0 SIGUSR1 and seen the
    dump appear: the dump is written while rank 0's main thread is inside gloo, and both go on afterwards."""
    import signal

    import torch
    import torch.distributed as dist

    from meshlm import diagnose
    from meshlm.comm import CommMeter, all_reduce_

    rank, meter = dist.get_rank(), CommMeter()
    undo = diagnose.on_signal(signal.SIGUSR1, lambda: diagnose.dump(
        meter, out_dir, rank=rank, world=2, layout={}, coords={}, step=0, reason="SIGUSR1"))
    try:
        pids = [None, None]
        dist.all_gather_object(pids, os.getpid())
        t = torch.ones(4)
        seen = None
        if rank == 1:
            time.sleep(1.0)  # rank 0 is in the all-reduce by now
            os.kill(pids[0], signal.SIGUSR1)
            path, deadline = diagnose.dump_path(out_dir, 0), time.monotonic() + 30
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            seen = json.loads(path.read_text()) if path.exists() else None
        all_reduce_(t, dist.group.WORLD, axis="dp", meter=meter)
        all_reduce_(t, dist.group.WORLD, axis="dp", meter=meter)  # and the job goes on
    finally:
        undo()
    return {"dump": seen, "sum": t.tolist()}


def test_sigusr1_dumps_a_rank_blocked_in_a_collective(dist, tmp_path):
    r0, r1 = dist(2).run(signal_while_blocked, str(tmp_path), timeout=60)
    dump = r1["dump"]
    assert dump is not None, "no dump from rank 0 within 30 s of SIGUSR1"
    assert dump["reason"] == "SIGUSR1"
    assert [(e["op"], e["axis"], e["seq"], e["end"]) for e in dump["ops"]] == [("all_reduce", "dp", 1, None)]
    assert r0["sum"] == r1["sum"] == [4.0] * 4


def test_recorder_overhead_bench_runs(tiny_dataset, capsys):
    """The overhead benchmark's smoke test, in this process (one rank: no collective, so no ring entry)."""
    from meshlm.bench.recorder_overhead import main as bench
    assert bench(["--pairs", "1", "--steps", "1", "--warmup", "1", "--model", "gpt-tiny", "--layout.dp", "1",
                  "--data.path", str(tiny_dataset.path), "--train.batch_size", "4", "--train.seq_len", "32"]) == 0
    out = capsys.readouterr().out
    assert "ratio on/off" in out and "0 ring entries" in out, out
