"""Checkpoints written per rank and read under any layout; restarts after a killed worker; inspection."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meshlm.cli import main
from meshlm.layout import Layout
from meshlm.train import checkpoint

from test_distributed import make_trainer


def run_until(data_path, preset, layout, out, *, until, total, resume):
    """Train (resuming from `out` if asked) until step `until` of a `total`-step schedule, then save."""
    trainer = make_trainer(data_path, preset, layout, steps=total)
    if resume:
        trainer.resume(Path(out))
    losses = []
    while trainer.step_num < until:
        losses.append(trainer.step().loss)
    trainer.save(Path(out))
    trainer.wait_for_checkpoint()
    params, _, _ = trainer.full_state()
    return {"losses": losses, "params": params, "rank": trainer.mesh.rank}


def run(dist, layout, *args, **kw):
    if layout.world_size == 1:
        return [run_until(*args[:1], args[1], layout, *args[2:], **kw)]
    return dist(layout.world_size).run(run_until, args[0], args[1], layout, *args[2:], **kw)


@pytest.mark.parametrize("preset, saved_as, loaded_as", [
    ("llama-tiny", Layout(dp=2, tp=2), Layout(tp=4)),
    ("llama-tiny", Layout(dp=2, tp=2), Layout(pp=2, dp=2, micro_batches=2)),
    ("llama-tiny", Layout(dp=2, tp=2), Layout(dp=4, zero=3)),
    ("llama-tiny", Layout(dp=2, tp=2), Layout()),
    ("gpt-tiny", Layout(pp=2, dp=2, zero=2, micro_batches=2), Layout(tp=2, sequence_parallel=True)),
    ("gpt-moe-tiny", Layout(ep=2, tp=2), Layout(ep=4)),
])
def test_checkpoint_reshards_and_training_continues(dist, tiny_dataset, tmp_path, preset, saved_as, loaded_as):
    """Saved under one layout after 2 steps, loaded under another: the parameters are the saved ones, and
    2 more steps give the losses of an uninterrupted 4-step run under the new layout."""
    path, out = str(tiny_dataset.path), str(tmp_path / "run")
    torch.set_num_threads(1)
    saved = run(dist, saved_as, path, preset, out, until=2, total=4, resume=False)[0]
    whole, _, manifest = checkpoint.load(checkpoint.resolve(out))
    assert manifest["world"] == saved_as.world_size and manifest["step"] == 2
    for n, t in saved["params"].items():
        assert torch.equal(whole[n], t), n  # the pieces add up to the whole tensors
    resumed = run(dist, loaded_as, path, preset, out, until=4, total=4, resume=True)
    straight = run(dist, loaded_as, path, preset, str(tmp_path / "straight"), until=4, total=4, resume=False)
    for r, s in zip(resumed, straight):
        assert r["losses"] == pytest.approx(s["losses"][2:], rel=1e-5)
        for n, t in s["params"].items():
            torch.testing.assert_close(r["params"][n], t, rtol=1e-4, atol=5e-5, msg=n)


def test_damaged_newest_checkpoint_is_skipped(tiny_dataset, tmp_path, capsys):
    path, out = str(tiny_dataset.path), tmp_path / "run"
    run_until(path, "gpt-tiny", Layout(), str(out), until=2, total=4, resume=False)
    run_until(path, "gpt-tiny", Layout(), str(out), until=3, total=4, resume=True)
    newest = checkpoint.resolve(out)
    data = bytearray((newest / "rank00000.safetensors").read_bytes())
    (newest / "rank00000.safetensors").write_bytes(bytes(data[: len(data) // 2]))  # truncated
    trainer = make_trainer(path, "gpt-tiny", Layout(), steps=4)
    assert trainer.resume(out) == 2
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "step_000003: rank00000.safetensors is corrupt (sha256 mismatch); trying the previous" in line
    assert newest.is_dir()  # nothing is deleted


def test_checkpoint_of_another_model_is_refused(tiny_dataset, tmp_path):
    path, out = str(tiny_dataset.path), tmp_path / "run"
    run_until(path, "gpt-tiny", Layout(), str(out), until=1, total=2, resume=False)
    trainer = make_trainer(path, "llama-tiny", Layout(), steps=2)
    with pytest.raises(checkpoint.CheckpointError, match="is of another model config"):
        trainer.resume(out)


def test_ckpt_inspect(capsys, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    run_until(str(tiny_dataset.path), "gpt-tiny", Layout(), str(out), until=1, total=2, resume=False)
    assert main(["ckpt", "inspect", str(out), "--tensors", "3"]) == 0
    text = capsys.readouterr().out
    assert "step 1, written by 1 rank(s) under single process" in text and "p/tok_emb" in text
    assert "all checksums verified" in text and "more (--tensors 0 lists all)" in text
    folder = checkpoint.resolve(out)
    (folder / "rank00000.json").write_text("{}")
    assert main(["ckpt", "inspect", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rank00000.json is corrupt (sha256 mismatch)" in err[0]


def _final_params(run_dir: Path) -> dict:
    return checkpoint.load(checkpoint.resolve(run_dir))[0]


def test_killed_worker_restarts_and_finishes_like_an_uninterrupted_run(tiny_dataset, tmp_path):
    """dp=2, --max-restarts 1: rank 1 is SIGKILLed before step 5 (after the step-4 checkpoint is on disk);
    the launcher restarts both workers, they resume from step 4, and the final parameters equal those of
    a run that was never interrupted."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RESTART_COUNT", "MESHLM_FAULT"):
        env.pop(k, None)
    args = ["--model", "gpt-tiny", "--data.path", str(tiny_dataset.path), "--train.batch_size", "8",
            "--train.seq_len", "32", "--train.steps", "6", "--train.eval_every", "0", "--train.ckpt_every", "2",
            "--train.keep_ckpts", "5", "--train.progress", "false", "--train.tensorboard", "false",
            "--layout.dp", "2"]
    runs = {}
    for name, fault in (("straight", None), ("killed", "rank=1,step=5")):
        e = dict(env, **({"MESHLM_FAULT": fault} if fault else {}))
        out = tmp_path / name
        proc = subprocess.run([sys.executable, "-m", "meshlm", "train", "--max-restarts", "1", *args,
                               "--train.out_dir", str(out)], env=e, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (proc, out)
    killed_proc, killed_out = runs["killed"]
    assert "restart 1 of the job: resuming from the newest complete checkpoint" in killed_proc.stdout
    steps = [json.loads(line)["step"] for line in (killed_out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 5, 6]  # step 5 logged before the kill, and again after the restart
    straight, killed = _final_params(runs["straight"][1]), _final_params(killed_out)
    for n, t in straight.items():
        assert torch.equal(killed[n], t), n


def test_max_restarts_bad_value(capsys):
    assert main(["train", "--max-restarts", "x"]) == 2
    assert "--max-restarts needs a non-negative integer" in capsys.readouterr().err


def test_partial_checkpoint_is_never_listed(tmp_path):
    snap = checkpoint.Snapshot(root=tmp_path, step=7, rank=1, world=2)
    snap.add("p/w", torch.ones(2, 2), shape=(2, 2))
    snap.write()  # rank 1 alone: no manifest, nothing published
    assert checkpoint.list_checkpoints(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == [".tmp-step_000007-0"]
    shutil.rmtree(tmp_path / ".tmp-step_000007-0")
