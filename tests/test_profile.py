"""Profiler traces (`--train.profile_steps`): one Chrome trace per rank, with meshlm's ranges named."""

import json
import os
import subprocess
import sys

import pytest

from meshlm.cli import main
from meshlm.settings import build_config
from meshlm.config import ConfigError


def test_profile_steps_are_checked(capsys):
    for bad, why in (("5-", "must be 'A-B'"), ("7-5", "1 <= A <= B"), ("0", "1 <= A <= B"), ("8-12", "train.steps")):
        with pytest.raises(ConfigError, match="train.profile_steps") as e:
            build_config(overrides={"train.profile_steps": bad, "train.steps": "10"})
        assert why in str(e.value), str(e.value)
    assert main(["train", "--train.profile_steps", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.profile_steps ('x')" in err[0], err


def test_trace_per_rank_names_collectives_and_pipeline_actions(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--model", "gpt-tiny", "--data.path", str(tiny_dataset.path), "--train.out_dir", str(out),
            "--train.batch_size", "8", "--train.seq_len", "32", "--train.eval_every", "0",
            "--train.progress", "false", "--train.tensorboard", "false", "--train.threads", "1",
            "--layout.pp", "2", "--layout.micro_batches", "2", "--train.steps", "3", "--train.profile_steps", "2-3"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-m", "meshlm", *argv], env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-6000:]
    assert "profiler trace of steps 2-3" in p.stdout
    for rank in (0, 1):
        events = json.loads((out / "profile" / f"rank{rank:05d}.json").read_text())["traceEvents"]
        names = {e.get("name") for e in events}
        assert "all_reduce pp" in names, sorted(n for n in names if n and " " in n)[:20]
        assert "pipeline F(mb 1, chunk 0)" in names and "pipeline B(mb 0, chunk 0)" in names
        assert any(n.startswith("p2p pp: ") for n in names if n)  # the sends and receives, with their actions
