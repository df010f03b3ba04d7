"""`meshlm bench`: every strategy as its own job, the PyTorch peers on exactly our math, failures recorded.

The end-to-end runs launch real jobs through torch.distributed.run (as `meshlm bench` does), on the
tiny model of --quick and a small dataset, so the loss curves of dp, torch DDP and torch FSDP2 can be
compared with the single-process curve: equal to rounding, which proves the peers run the same math.
"""

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshlm.bench import STRATEGIES, parse_args
from meshlm.bench.report import TABLES, advise, console_table, markdown, ratio, readme_section
from meshlm.bench.run import SUITE_STEPS, SUITE_WARMUP, plan_jobs
from meshlm.bench.strategies import SUITES
from meshlm.cli import main
from meshlm.config import ConfigError, param_count, preset

REQUIRED = ("strategy", "world_size", "step_time_s", "tokens_per_s", "peak_mem_bytes", "state_bytes_per_rank",
            "comm_bytes_per_step", "losses")


def _clean(monkeypatch):
    """No torchrun variables from outside (the bench launches its own jobs); one thread per process."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT",
              "MESHLM_BENCH_FAIL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return monkeypatch


@pytest.fixture
def clean_env(monkeypatch):
    return _clean(monkeypatch)


def bench(tiny_dataset, out, *extra):
    return main(["bench", "--quick", "--world-size", "2", "--out", str(out), "--data.path", str(tiny_dataset.path),
                 *extra])


QUICK_ROWS = ("single", "dp", "torch-ddp", "torch-fsdp2", "tp", "tp-sp", "torch-tp")


@dataclass
class Bench:
    out: str
    """What the bench printed."""
    records: list[dict]
    path: Path


@pytest.fixture(scope="module")
def quick_rows(tiny_dataset, tmp_path_factory):
    """One --quick bench of the data- and tensor-parallel rows and their PyTorch peers, for the two tests below
    (a job per strategy as always; the single job, their common baseline, once)."""
    path = tmp_path_factory.mktemp("quick-rows")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        _clean(mp)
        assert bench(tiny_dataset, path, "--strategies", ",".join(QUICK_ROWS)) == 0
    return Bench(printed.getvalue(), json.loads((path / "results.json").read_text()), path)


def test_peers_run_our_math(quick_rows, tiny_dataset):
    out, records, tmp_path = quick_rows.out, quick_rows.records, quick_rows.path
    for name in QUICK_ROWS:  # a line as each starts and finishes, then the table
        assert f"{name}: done in" in out
    assert "vs PyTorch peer" in out
    # the calibrated cpu model's predictions beside the measurements, and their median errors
    assert "pred step" in out and "pred mem" in out
    assert "prediction vs measurement, median absolute error: step time" in out

    assert [r["strategy"] for r in records] == list(QUICK_ROWS)
    by = {r["strategy"]: r for r in records}
    for r in records:
        assert not r.get("error"), r
        assert all(r[k] is not None for k in REQUIRED), r
        assert len(r["losses"]) == 2 + 5 and r["step_time_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(8 * 64 / r["step_time_s"])
        assert r["world_size"] == (1 if r["strategy"] == "single" else 2)
        assert r["predicted_step_time_s"] > 0 and r["predicted_mem_bytes"] > 0, r
        # each rank's CPU seconds per step: positive, and a 1-thread process can't use more than the step's wall
        # time by much (gloo's threads add a little)
        cpu = r["cpu_s_per_step_ranks"]
        assert len(cpu) == r["world_size"] and all(0 < c < 3 * max(r["step_times_s"]) for c in cpu), cpu
    assert by["torch-fsdp2"]["predicted_layout"] == "dp2 (zero 3)"
    # the proof: the same model, data and global batch give the same loss curve, step by step
    for name in ("dp", "torch-ddp", "torch-fsdp2"):
        assert by[name]["losses"] == pytest.approx(by["single"]["losses"], rel=1e-4), name
    assert by["single"]["losses"][-1] < by["single"]["losses"][0]

    # bytes: DP-style replicas hold 16 bytes per parameter (4 weights + 4 gradients + 8 AdamW moments);
    # FSDP2 holds half of that on each of 2 ranks; both all-reduce / reduce-scatter 4 bytes per parameter.
    psi = param_count(preset("gpt-tiny"), vocab_size=tiny_dataset.vocab_size)["total"]
    assert by["single"]["comm_bytes_per_step"] == {}
    for name in ("single", "dp", "torch-ddp"):
        assert by[name]["state_bytes_per_rank"] == pytest.approx(16 * psi, rel=0.01), name
    assert by["torch-fsdp2"]["state_bytes_per_rank"] == pytest.approx(8 * psi, rel=0.02)
    assert by["dp"]["comm_bytes_per_step"]["all_reduce/dp"] == 4 * psi
    assert by["torch-ddp"]["comm_bytes_per_step"]["all_reduce/dp"] == 4 * psi
    assert by["torch-fsdp2"]["comm_bytes_per_step"]["reduce_scatter/dp"] == 4 * psi
    assert "analytical" in by["torch-fsdp2"]["note"]

    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# meshlm bench\n\n```\nmeshlm bench --quick --world-size 2 --out ")
    assert "| strategy | ranks | step time | tokens/s | speed-up |" in report
    assert "| pred step (error) | vs PyTorch peer |" in report and "| pred mem (error) |" in report
    assert "median absolute error" in report
    dp_row = next(line for line in report.splitlines() if line.startswith("| dp |"))
    assert dp_row.rstrip(" |").endswith("x torch-ddp") and "| n/a: a peer |" in report
    assert (tmp_path / "step_time.png").is_file() or "matplotlib is not installed" in report


@pytest.fixture(scope="module")
def failing_rows(tiny_dataset, tmp_path_factory):
    """dp (its last rank fails at step 1, injected), single and the hybrid dp2-cp2 at 2 steps, for the two tests
    that look at them (a job per strategy as always; one bench)."""
    path = tmp_path_factory.mktemp("failing-rows")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        _clean(mp).setenv("MESHLM_BENCH_FAIL", "dp")
        assert bench(tiny_dataset, path, "--strategies", "dp,single,dp2-cp2", "--steps", "2", "--warmup", "1") == 0
    return Bench(printed.getvalue(), json.loads((path / "results.json").read_text()), path)


def test_a_failing_job_is_recorded_and_the_others_run(failing_rows):
    """A rank that dies mid-job (injected on purpose) ends its job; the bench records it and goes on."""
    out, tmp_path = failing_rows.out, failing_rows.path
    assert "dp: FAILED" in out and "single: done in" in out and "dp2-cp2: done in" in out
    dp, single, hybrid = failing_rows.records
    assert dp["strategy"] == "dp" and "injected failure (MESHLM_BENCH_FAIL=dp) on rank 1 at step 1" in dp["error"]
    assert not single.get("error") and len(single["losses"]) == 3
    assert not hybrid.get("error") and len(hybrid["losses"]) == 3
    report = (tmp_path / "report.md").read_text()
    assert "| dp | 2 | failed |" in report and "## Failed" in report and "injected failure" in report


def error_line(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err  # one clear line, no traceback
    return err[0]


@pytest.mark.parametrize("extra, message", [
    (["--strategies", "single,dpp"], "unknown strategy 'dpp' in --strategies; choose from: single, dp, zero1"),
    (["--strategies", "dp,dp"], "strategy 'dp' appears twice"),
    (["--world-size", "0"], "--world-size (0) must be >= 1"),
    (["--world-size", "two"], "--world-size ('two') must be an integer"),
    (["--world-size", "3"], "--world-size (3) times layout.micro_batches (1) must divide train.batch_size (8)"),
    (["--steps", "0"], "--steps (0) must be >= 1"),
    (["--layout.dp", "2"], "--layout.dp is set by each strategy"),
    (["--train.steps", "3"], "--train.steps is set by the bench; use --steps and --warmup"),
    (["--train.stepz", "3"], "unknown setting 'train.stepz'"),
    (["--strategies"], "--strategies needs a value"),
])
def test_bad_input_one_line_exit_2(clean_env, capsys, tmp_path, extra, message):
    line = error_line(capsys, ["bench", "--quick", "--out", str(tmp_path), *extra])
    assert line.startswith("meshlm: error: ") and message in line, line
    assert not (tmp_path / "results.json").exists()


def test_quick_defaults_and_overrides():
    a = parse_args(["--quick", "--train.batch_size", "16", "--model", "llama-tiny"])
    assert a.steps == 5 and a.warmup == 2 and a.world_size == 2 and [s.name for s in a.strategies] == list(STRATEGIES)
    assert a.settings == {"model.preset": "llama-tiny", "train.seq_len": "64", "train.batch_size": "16"}
    b = parse_args(["--strategies=ps,zero3", "--steps", "4", "--out", "x"])
    assert b.steps == 4 and b.warmup == 3 and b.settings == {} and [s.name for s in b.strategies] == ["ps", "zero3"]
    assert STRATEGIES["zero2"].overrides(4) == {"layout.dp": "4", "layout.zero": "2"}
    with pytest.raises(ConfigError, match="names no strategy"):
        parse_args(["--strategies", ","])


def test_report_ratios_and_failures():
    def rec(name, ms, world=2):
        return {"strategy": name, "world_size": world, "step_time_s": ms / 1e3, "tokens_per_s": 1e3 / ms,
                "peak_mem_bytes": 3e8, "state_bytes_per_rank": 2e6, "comm_bytes_per_step": {"all_reduce/dp": 5e5},
                "losses": [6.0, 5.5], "note": ""}

    records = [rec("single", 40, 1), rec("dp", 10), rec("torch-ddp", 20), rec("zero2", 30),
               {"strategy": "zero3", "world_size": 2, "error": "LayoutError: zero (3) is not implemented yet"}]
    records[0]["comm_bytes_per_step"] = {}
    records[1]["losses"] = [6.0, 5.5 + 2e-6]
    assert ratio(records[1], records[2]) == pytest.approx(0.5)
    assert ratio(records[3], None) is None and ratio(records[4], records[0]) is None
    md = markdown(records, command="meshlm bench --quick", context="ctx")
    throughput = md.split("## Throughput and scaling")[1].split("## Memory")[0]
    rows = {line.split(" | ")[0][2:]: line for line in throughput.splitlines() if line.startswith("| ")}
    assert "| 4.00x | 200.0% |" in rows["dp"] and rows["dp"].endswith("| 0.50x torch-ddp |")
    assert rows["zero2"].endswith("| n/a: torch-fsdp2-z2 not run at 2 ranks |")
    assert "| zero3 | 2 | failed |" in md and "- `zero3`: LayoutError: zero (3) is not implemented yet" in md
    parity = md.split("## Pipeline bubble and loss parity")[1]
    assert "| dp | 2 | n/a: not recorded | n/a: not recorded | 5.5000 | 3.6e-07 |" in parity  # 2e-6 / 5.5
    comm = md.split("## Communication per step")[1]
    assert "| dp | 2 | dp 500.00 kB | dp not timed | n/a: not timed |" in comm  # no seconds recorded
    table = console_table(records)
    assert table.splitlines()[0].startswith("strategy") and "zero3 failed: LayoutError" in table
    assert table.splitlines()[-1] == "prediction: no row has a calibrated prediction"
    records[0].update(predicted_step_time_s=0.044, predicted_mem_bytes=1.5e8, base_mem_bytes=1e8)  # +10%, -25%
    records[1].update(predicted_step_time_s=0.008, predicted_mem_bytes=2e8, base_mem_bytes=1e8)  # -20%, 0%
    assert console_table(records).splitlines()[-1] == ("prediction vs measurement, median absolute error: "
                                                       "step time 15.0% over 2 rows; memory (peak - base) "
                                                       "12.5% over 2 rows")
    assert "44.0 ms (+10%)" in markdown(records, command="c", context="x")


def synthetic_suite() -> list[dict]:
    """Records as a --suite run writes them: baselines, rows at 2 and 4 ranks, a pipeline row, a peer whose
    collectives are not counted, one not run."""
    def rec(name, world, ms, **extra):
        r = {"strategy": name, "world_size": world, "step_time_s": ms / 1e3, "tokens_per_s": 1024e3 / ms,
             "peak_mem_bytes": 4e8, "base_mem_bytes": 2.5e8, "state_bytes_per_rank": 16e6,
             "mem_split": {"params": 4e6, "grads": 4e6, "optim": 8e6, "activations": 30e6},
             "comm_bytes_per_step": {}, "comm_seconds_per_step": {}, "comm_coverage": "measured",
             "bubble_measured": None, "bubble_measured_note": "n/a: no pipeline", "bubble_predicted": None,
             "bubble_predicted_note": "n/a: no pipeline", "losses": [9.0, 8.5, 8.0], "note": "",
             "predicted_step_time_s": ms / 1e3 * 1.2, "predicted_mem_bytes": 1.8e8}
        r.update(extra)
        return r

    dp = {"comm_bytes_per_step": {"all_reduce/dp": 4e6, "all_reduce_wait/dp": 0.0, "all_reduce/data": 4.0},
          "comm_seconds_per_step": {"all_reduce/dp": 0.0, "all_reduce_wait/dp": 0.01, "all_reduce/data": 0.002}}
    return [rec("single", 1, 100), rec("moe-single", 1, 150),
            rec("dp", 2, 60, **dp), rec("dp", 4, 40, **dp, losses=[9.0, 8.5, 8.0 + 8e-7]),
            rec("zero3", 4, 50, comm_bytes_per_step={"all_gather/dp": 8e6, "reduce_scatter/dp": 4e6},
                comm_seconds_per_step={"all_gather/dp": 0.0, "reduce_scatter/dp": 0.0},
                mem_split={"params": 1e6, "grads": 1e6, "optim": 2e6, "activations": 30e6}),
            rec("pp-1f1b", 4, 80, comm_bytes_per_step={"p2p/pp": 1e5}, comm_seconds_per_step={"p2p/pp": 0.02},
                bubble_measured=0.5, bubble_measured_note="", bubble_predicted=3 / 11, bubble_predicted_note="",
                timeline=[[0, "F0.0", 0.0, 0.01], [0, "B0.0", 0.03, 0.05], [1, "F0.0", 0.01, 0.02],
                          [1, "B0.0", 0.02, 0.04]]),
            rec("torch-tp", 4, 70, comm_coverage="not counted: DTensor's collectives run inside its operators"),
            rec("ep", 4, 90, losses=[9.1, 8.6, 8.1]),
            {"strategy": "pp-interleaved", "world_size": 8, "skipped": "pp*vpp (16) must not exceed n_layers (8)"}]


def test_suite_report_fills_every_column(tmp_path):
    """Every table row has every column, filled or saying why not; the derived figures are right; the README
    section and the advice are built from the same rows; the plots are drawn."""
    records = synthetic_suite()
    md = markdown(records, command="meshlm bench --suite full", context="ctx", advice=advise(records, cores=4))
    for title in TABLES:
        section = md.split(f"## {title}")[1].split("\n## ")[0]
        rows = [line for line in section.splitlines() if line.startswith("| ") and "---|" not in line][1:]
        assert len(rows) == 8, title  # every row that ran, none of the one not run
        for row in rows:
            cells = [c.strip() for c in row.strip("|").split(" | ")]
            assert len(cells) == 2 + len(TABLES[title]) and all(c and c != "-" for c in cells), (title, row)
    by = {(r["strategy"], r["world_size"]): r for r in records}
    dp4 = by[("dp", 4)]
    assert dp4["speedup"] == pytest.approx(2.5) and dp4["scaling_efficiency"] == pytest.approx(2.5 / 4)
    assert dp4["loss_parity"] == pytest.approx(1e-7) and by[("ep", 4)]["baseline"] == "moe-single"
    assert dp4["comm_axes"]["dp"] == {"bytes": 4e6, "seconds": 0.01, "untimed": []}  # the wait times the reduce
    assert dp4["comm_share"] == pytest.approx(0.012 / 0.04)
    assert dp4["mem_other_bytes"] == pytest.approx(1.5e8 - 46e6) and dp4["pred_step_error"] == pytest.approx(0.2)
    assert by[("zero3", 4)]["comm_axes"]["dp"]["untimed"] == ["all_gather", "reduce_scatter"]
    assert "| zero3 | 4 | dp 12.00 MB | dp not timed | n/a: not timed |" in md
    assert "| torch-tp | 4 | n/a: peer, not counted: DTensor's" in md
    assert "| pp-1f1b | 4 | 50.0% | 27.3% | 8.0000 | 0.0e+00 |" in md
    assert "| pp-interleaved | 8 | pp*vpp (16) must not exceed n_layers (8) |" in md.split("## Not run")[1]
    advice = advise(records, cores=4)  # speed read at the largest world size that fits the cores
    assert any(a.startswith("Fastest at 4 ranks (one per core of this 4-core machine): dp (25.6k tokens/s)")
               for a in advice), advice
    assert any("pp-1f1b 50.0% (simulated 27.3%)" in a for a in advice)
    assert advise(records, cores=2)[0].startswith("Fastest at 2 ranks (one per core of this 2-core machine): dp")
    readme = readme_section(records, command="meshlm bench --suite full", took_s=600, context="ctx",
                            plot="scaling.png", cores=4)
    assert readme.startswith("`meshlm bench --suite full` (10.0 min on this machine; ctx)")
    assert "| dp | 4 | 25.6k | 2.50x | 16.00 MB | 30.00 MB | 30.0% |" in readme and "![scaling" in readme
    assert "| dp | 2 |" not in readme and "| torch-tp |" not in readme  # one world size; peers as ratios
    pytest.importorskip("matplotlib")
    from meshlm.bench.plots import plot_all
    plots, note = plot_all(records, tmp_path, cores=2)
    assert note == "" and "Pipeline timeline: pp-1f1b-4" in plots
    for path in plots.values():
        assert (tmp_path / path).stat().st_size > 5000, path


def test_suite_plan_sweeps_world_sizes_and_says_why_not():
    """--suite full: every strategy at 1, 2, 4 and 8 ranks, or the reason it does not run there."""
    args = parse_args(["--suite", "full", "--model.n_heads", "4"])
    assert args.world_sizes == (1, 2, 4, 8) and args.steps == SUITE_STEPS and args.warmup == SUITE_WARMUP
    assert [s.name for s in args.strategies] == SUITES["full"] and "deepspeed-zero1" not in SUITES["full"]
    jobs = plan_jobs(args, args.settings)
    assert [(j.strategy.name, j.world) for j in jobs[:2]] == [("single", 1), ("moe-single", 1)]
    plan = {(j.strategy.name, j.ranks): j.skip for j in jobs}
    assert len(plan) == len(jobs)  # no job twice
    for name in SUITES["full"]:
        s = STRATEGIES[name]
        sizes = [1] if not s.distributed else [s.world] if s.world else [1, 2, 4, 8]
        assert all((name, w) in plan for w in sizes), name
    assert plan[("dp", 8)] == "" and plan[("tp", 4)] == "" and plan[("pp-zb", 8)] == ""
    assert plan[("dp", 1)].startswith("world size 1: every degree is 1")
    assert plan[("tp", 8)] == "tp (8) must divide n_heads (4)"
    assert plan[("torch-tp", 8)] == "tp (8) must divide n_heads (4)"
    assert plan[("pp-interleaved", 8)] == "pp*vpp (16) must not exceed n_layers (8)"
    assert plan[("torch-pp-zb", 8)] == "pp*vpp (16) must not exceed n_layers (8)"
    assert plan[("dp2-tp2-pp2", 8)] == "" and plan[("tp2-sp-cp2", 4)] == ""
    narrow = parse_args(["--suite", "full", "--strategies", "ep,dp2-cp2", "--world-sizes", "2,1"])
    jobs = plan_jobs(narrow, narrow.settings)  # moe-single comes along: ep's curve is compared with it
    assert [(j.strategy.name, j.ranks, bool(j.skip)) for j in jobs] == [
        ("moe-single", 1, False), ("ep", 1, True), ("ep", 2, False), ("dp2-cp2", 4, True)]
    assert jobs[-1].skip == "a layout of 4 ranks; the world sizes swept are 1, 2"
    with pytest.raises(ConfigError, match="with --suite use --world-sizes"):
        parse_args(["--suite", "full", "--world-size", "4"])


@pytest.mark.parametrize("schedule, p, m, v, expected", [
    ("1f1b", 2, 4, 1, 1 / 5), ("1f1b", 4, 8, 1, 3 / 11), ("gpipe", 8, 16, 1, 7 / 23),
    ("interleaved", 4, 8, 2, 3 / 19)])
def test_predicted_bubble_is_the_schedule_formula(schedule, p, m, v, expected):
    """(p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(v*m+p-1) interleaved: the simulator on the row's own table."""
    from meshlm.bench.worker import predicted_bubble
    from meshlm.settings import build_config

    cfg = build_config(overrides={"model.preset": "gpt-tiny", "model.n_layers": "16", "layout.pp": str(p),
                                  "layout.schedule": schedule, "layout.vpp": str(v), "layout.micro_batches": str(m)})
    assert predicted_bubble(f"pp-{schedule}", cfg, p) == (pytest.approx(expected), "")
    assert predicted_bubble(f"torch-pp-{schedule}", cfg, p)[0] == pytest.approx(expected)
    assert predicted_bubble("dp", build_config(overrides={"layout.dp": "2"}), 2) == (None, "n/a: no pipeline")


def test_suite_end_to_end(clean_env, capsys, tiny_dataset, tmp_path):
    """A real --suite run, narrowed to dp and pp-1f1b at 1 and 2 ranks: single comes along as the baseline,
    every column is filled, the figures hold (loss parity, the state split by the formula, the 1F1B bubble)."""
    assert main(["bench", "--suite", "full", "--strategies", "dp,pp-1f1b", "--world-sizes", "1,2", "--steps", "2",
                 "--out", str(tmp_path), "--data.path", str(tiny_dataset.path)]) == 0
    out = capsys.readouterr().out
    records = json.loads((tmp_path / "results.json").read_text())
    assert [(r["strategy"], r["world_size"], bool(r.get("skipped"))) for r in records] == [
        ("single", 1, False), ("dp", 1, True), ("pp-1f1b", 1, True), ("dp", 2, False), ("pp-1f1b", 2, False)]
    assert "3 jobs in" in out
    by = {(r["strategy"], r["world_size"]): r for r in records}
    single, dp, pp = by[("single", 1)], by[("dp", 2)], by[("pp-1f1b", 2)]
    for r in (single, dp, pp):
        assert not r.get("error"), r
        assert len(r["losses"]) == 1 + 2 and r["speedup"] > 0 and r["comm_share"] is not None
    assert dp["loss_parity"] < 1e-5 and pp["loss_parity"] < 1e-5 and single["loss_parity"] == 0
    # the state split by the formula: fp32 weights 4, gradients 4, AdamW moments 8 bytes per parameter
    psi = single["n_params"]
    for r in (single, dp):
        assert r["mem_split"]["params"] == pytest.approx(4 * psi, rel=0.01)
        assert r["mem_split"]["grads"] == pytest.approx(4 * psi, rel=0.01)
        assert r["mem_split"]["optim"] == pytest.approx(8 * psi, rel=0.01)
    # activations halve with the batch split over 2 ranks (the same sequences, half as many per rank)
    assert dp["mem_split"]["activations"] == pytest.approx(single["mem_split"]["activations"] / 2, rel=0.05)
    for r in (single, dp, pp):  # the four kinds fit inside the peak above the baseline; the rest is the runtime
        held = sum(r["mem_split"].values())
        assert 0 < held < r["mem_above_base_bytes"] and r["mem_other_bytes"] < 400e6, r["mem_split"]
    assert dp["comm_axes"]["dp"]["bytes"] == 4 * psi and dp["comm_axes"]["dp"]["seconds"] > 0
    assert pp["bubble_predicted"] == pytest.approx(1 / 5)  # p = 2, m = 4: (p-1)/(m+p-1)
    assert 0 < pp["bubble_measured"] < 1 and len(pp["timeline"]) == 2 * 4 * 2  # F and B of 4 micro-batches, 2 stages
    report = (tmp_path / "report.md").read_text()
    assert ("| dp, pp-1f1b | 1 | world size 1: every degree is 1, the single process's layout (its row: single) |"
            in report)
    assert "## Which strategy should I use" in report and "![Scaling](scaling.png)" in report
    readme = (tmp_path / "README_section.md").read_text()
    assert readme.startswith("`meshlm bench --suite full --strategies dp,pp-1f1b") and "| pp-1f1b | 2 |" in readme
    if "matplotlib is not installed" not in report:
        for name in ("throughput", "scaling", "memory", "comm_share", "loss"):
            assert (tmp_path / f"{name}.png").is_file(), name
        assert (tmp_path / "timelines" / "pp-1f1b-2.png").is_file()


def test_tensor_parallel_rows(quick_rows):
    """tp, tp-sp and PyTorch's DTensor TP run the same math: equal loss curves; ratios to torch-tp."""
    by, tmp_path = {r["strategy"]: r for r in quick_rows.records}, quick_rows.path
    for name in ("tp", "tp-sp", "torch-tp"):
        assert not by[name].get("error"), by[name]
        assert by[name]["losses"] == pytest.approx(by["single"]["losses"], rel=1e-4), name
    # vocabulary, heads and MLP split over 2 ranks: about half the state of one replica
    assert by["tp"]["state_bytes_per_rank"] < 0.6 * by["single"]["state_bytes_per_rank"]
    report = (tmp_path / "report.md").read_text()
    assert "x torch-tp" in report


def test_pipeline_rows(clean_env, capsys, tiny_dataset, tmp_path):
    """Our pipeline schedules and torch.distributed.pipelining's, on the same stages: equal loss curves."""
    assert bench(tiny_dataset, tmp_path, "--strategies", "single,pp-1f1b,pp-zb,torch-pp-1f1b,torch-pp-zb",
                 "--model.n_layers", "4") == 0
    by = {r["strategy"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    for name in ("pp-1f1b", "pp-zb", "torch-pp-1f1b", "torch-pp-zb"):
        assert not by[name].get("error"), by[name]
        assert by[name]["losses"] == pytest.approx(by["single"]["losses"], rel=1e-5), name
    assert "x torch-pp-1f1b" in (tmp_path / "report.md").read_text()


def test_moe_rows(clean_env, capsys, tiny_dataset, tmp_path):
    """moe-single and ep: the same MoE model, the same curve; ep sends tokens by all-to-all and holds half
    the experts; the rows compare with moe-single and carry the routing's load imbalance."""
    assert bench(tiny_dataset, tmp_path, "--strategies", "moe-single,ep", "--steps", "2", "--warmup", "1") == 0
    by = {r["strategy"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    single, ep = by["moe-single"], by["ep"]
    assert not single.get("error") and not ep.get("error"), (single, ep)
    assert ep["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert ep["comm_bytes_per_step"]["all_to_all/ep"] > 0 and "all_to_all/ep" not in single["comm_bytes_per_step"]
    assert ep["state_bytes_per_rank"] < single["state_bytes_per_rank"]  # half of the experts' weights and states
    assert ep["moe"]["moe_expert_tokens"] == single["moe"]["moe_expert_tokens"]
    assert ep["moe"]["moe_imbalance"] >= 1.0 and "load imbalance" in ep["note"]
    assert ep["baseline"] == "moe-single" and ep["loss_parity"] < 1e-5 and ep["speedup"] > 0
    assert ep["comm_axes"]["ep"]["seconds"] > 0


def test_hybrid_row_runs_its_own_world(failing_rows):
    """A hybrid row has fixed degrees: dp2-cp2 runs 4 ranks whatever --world-size says, on single's curve,
    and its communication is reported per axis."""
    by = {r["strategy"]: r for r in failing_rows.records}
    assert by["dp2-cp2"]["world_size"] == 4 and not by["dp2-cp2"].get("error")
    assert by["dp2-cp2"]["losses"] == pytest.approx(by["single"]["losses"], rel=1e-5)
    comm = by["dp2-cp2"]["comm_bytes_per_step"]
    assert comm["send_recv/cp"] > 0 and comm["all_reduce/dp"] > 0


def test_hybrid_row_layout_checked_before_any_job(capsys, tiny_dataset, tmp_path):
    code = bench(tiny_dataset, tmp_path, "--strategies", "dp2-cp2", "--train.seq_len", "30")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "strategy dp2-cp2: seq_len (30) must be divisible by 4" in err[0]


def test_repeat_keeps_each_rows_fastest_round():
    from meshlm.bench.run import best_round

    assert parse_args(["--quick"]).repeat == 1 and parse_args(["--quick", "--repeat", "3"]).repeat == 3
    with pytest.raises(ConfigError, match=r"--repeat \(0\) must be >= 1"):
        parse_args(["--repeat", "0"])
    slow, fast, failed = {"step_time_s": 0.3, "n": 1}, {"step_time_s": 0.2, "n": 2}, {"step_time_s": None, "error": "x"}
    row = best_round([slow, failed, fast])
    assert row["n"] == 2 and row["step_time_rounds_s"] == [0.3, None, 0.2]
    assert best_round([failed])["error"] == "x" and "step_time_rounds_s" not in best_round([fast])
