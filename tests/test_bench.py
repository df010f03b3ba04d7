"""`meshlm bench`: every strategy as its own job, the PyTorch peers on exactly our math, failures recorded.

The end-to-end runs launch real jobs through torch.distributed.run (as `meshlm bench` does), on the
tiny model of --quick and a small dataset, so the loss curves of dp, torch DDP and torch FSDP2 can be
compared with the single-process curve: equal to rounding, which proves the peers run the same math.
"""

import json

import pytest

from meshlm.bench import STRATEGIES, parse_args
from meshlm.bench.report import console_table, markdown, ratio
from meshlm.cli import main
from meshlm.config import ConfigError, param_count, preset

REQUIRED = ("strategy", "world_size", "step_time_s", "tokens_per_s", "peak_mem_bytes", "state_bytes_per_rank",
            "comm_bytes_per_step", "losses")


@pytest.fixture
def clean_env(monkeypatch):
    """No torchrun variables from outside (the bench launches its own jobs); one thread per process."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT",
              "MESHLM_BENCH_FAIL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return monkeypatch


def bench(tiny_dataset, out, *extra):
    return main(["bench", "--quick", "--world-size", "2", "--out", str(out), "--data.path", str(tiny_dataset.path),
                 *extra])


def test_peers_run_our_math(clean_env, capsys, tiny_dataset, tmp_path):
    assert bench(tiny_dataset, tmp_path, "--strategies", "single,dp,torch-ddp,torch-fsdp2") == 0
    out = capsys.readouterr().out
    for name in ("single", "dp", "torch-ddp", "torch-fsdp2"):  # a line as each starts and finishes, then the table
        assert f"{name}: done in" in out
    assert "vs PyTorch peer" in out
    # the calibrated cpu model's predictions beside the measurements, and their median errors
    assert "pred step" in out and "pred mem" in out
    assert "prediction vs measurement, median absolute error: step time" in out

    records = json.loads((tmp_path / "results.json").read_text())
    assert [r["strategy"] for r in records] == ["single", "dp", "torch-ddp", "torch-fsdp2"]
    by = {r["strategy"]: r for r in records}
    for r in records:
        assert not r.get("error"), r
        assert all(r[k] is not None for k in REQUIRED), r
        assert len(r["losses"]) == 2 + 5 and r["step_time_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(8 * 64 / r["step_time_s"])
        assert r["world_size"] == (1 if r["strategy"] == "single" else 2)
        assert r["predicted_step_time_s"] > 0 and r["predicted_mem_bytes"] > 0, r
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
    assert "| strategy | ranks | step time |" in report and "| vs PyTorch peer | vs single |" in report
    assert "| pred step | pred mem |" in report and "median absolute error" in report
    dp_row = next(line for line in report.splitlines() if line.startswith("| dp |"))
    assert "x torch-ddp" in dp_row and dp_row.rstrip(" |").endswith("x")
    assert (tmp_path / "step_time.png").is_file() or "matplotlib is not installed" in report


def test_a_failing_job_is_recorded_and_the_others_run(clean_env, capsys, tiny_dataset, tmp_path):
    """A rank that dies mid-job (injected on purpose) ends its job; the bench records it and goes on."""
    clean_env.setenv("MESHLM_BENCH_FAIL", "dp")
    assert bench(tiny_dataset, tmp_path, "--strategies", "dp,single", "--steps", "2", "--warmup", "1") == 0
    out = capsys.readouterr().out
    assert "dp: FAILED" in out and "single: done in" in out
    records = json.loads((tmp_path / "results.json").read_text())
    dp, single = records
    assert dp["strategy"] == "dp" and "injected failure (MESHLM_BENCH_FAIL=dp) on rank 1 at step 1" in dp["error"]
    assert not single.get("error") and len(single["losses"]) == 3
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
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ") and " | " in line}
    assert "0.50x torch-ddp" in rows["dp"] and rows["dp"].endswith("| 0.25x |") and "2.0e-06" in rows["dp"]
    assert "| - | 0.75x |" in rows["zero2"]  # its peer (torch-fsdp2-z2) did not run
    assert "| zero3 | 2 | failed |" in md and "- `zero3`: LayoutError: zero (3) is not implemented yet" in md
    assert "500.00 kB (all_reduce/dp 500.00 kB)" in rows["dp"]
    table = console_table(records)
    assert table.splitlines()[0].startswith("strategy") and "zero3 failed: LayoutError" in table
    assert table.splitlines()[-1] == "prediction: no row has a calibrated prediction"
    records[0].update(predicted_step_time_s=0.044, predicted_mem_bytes=1.5e8, base_mem_bytes=1e8)  # +10%, -25%
    records[1].update(predicted_step_time_s=0.008, predicted_mem_bytes=2e8, base_mem_bytes=1e8)  # -20%, 0%
    assert console_table(records).splitlines()[-1] == ("prediction vs measurement, median absolute error: "
                                                       "step time 15.0% over 2 rows; memory (peak - base) "
                                                       "12.5% over 2 rows")
    assert "44.0 ms (1.10x)" in markdown(records, command="c", context="x")


def test_tensor_parallel_rows(clean_env, capsys, tiny_dataset, tmp_path):
    """tp, tp-sp and PyTorch's DTensor TP run the same math: equal loss curves; ratios to torch-tp."""
    assert bench(tiny_dataset, tmp_path, "--strategies", "single,tp,tp-sp,torch-tp") == 0
    by = {r["strategy"]: r for r in json.loads((tmp_path / "results.json").read_text())}
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
    ep_row = next(line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| ep |"))
    assert ep_row.rstrip(" |").endswith("x") and "| - |" not in ep_row.split("|")[9]  # a loss diff vs moe-single


def test_hybrid_row_runs_its_own_world(clean_env, capsys, tiny_dataset, tmp_path):
    """A hybrid row has fixed degrees: dp2-cp2 runs 4 ranks whatever --world-size says, on single's curve,
    and its communication is reported per axis."""
    assert bench(tiny_dataset, tmp_path, "--strategies", "single,dp2-cp2", "--steps", "2", "--warmup", "1") == 0
    by = {r["strategy"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert by["dp2-cp2"]["world_size"] == 4 and not by["dp2-cp2"].get("error")
    assert by["dp2-cp2"]["losses"] == pytest.approx(by["single"]["losses"], rel=1e-5)
    comm = by["dp2-cp2"]["comm_bytes_per_step"]
    assert comm["send_recv/cp"] > 0 and comm["all_reduce/dp"] > 0


def test_hybrid_row_layout_checked_before_any_job(capsys, tiny_dataset, tmp_path):
    code = bench(tiny_dataset, tmp_path, "--strategies", "dp2-cp2", "--train.seq_len", "30")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "strategy dp2-cp2: seq_len (30) must be divisible by 4" in err[0]
