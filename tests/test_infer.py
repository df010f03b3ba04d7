"""Generation with a KV cache: equal to recomputation, batched equal to alone, tp/pp equal to one process."""

import os
import subprocess
import sys

import pytest
import torch

from meshlm.cli import main
from meshlm.config import PRESETS
from meshlm.infer.engine import Engine, sample
from meshlm.layout import Layout
from meshlm.mesh import Mesh

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3], [40, 41, 42, 43]]


def cfg_of(preset):
    return PRESETS[preset].replace(vocab_size=512, n_layers=2)


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny", "llama-moe-tiny"])
def test_cache_equals_recomputation_and_batch_equals_alone(preset):
    engine = Engine(cfg_of(preset), mesh=Mesh.single(), seed=0)
    cached = engine.generate(PROMPTS, max_new_tokens=12)
    assert cached == engine.generate(PROMPTS, max_new_tokens=12, use_cache=False)
    assert cached == [engine.generate([p], max_new_tokens=12)[0] for p in PROMPTS]
    assert len({tuple(c) for c in cached}) > 1  # not a degenerate model
    # sampling: row i draws from seed + i, so a batch equals each prompt alone with its seed
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9)
    batch = engine.generate(PROMPTS, seed=3, **kw)
    assert batch == [engine.generate([p], seed=3 + i, **kw)[0] for i, p in enumerate(PROMPTS)]
    assert batch != engine.generate(PROMPTS, seed=4, **kw)


def test_stop_tokens_and_limits():
    engine = Engine(cfg_of("gpt-tiny"), mesh=Mesh.single(), seed=0)
    free = engine.generate(PROMPTS, max_new_tokens=10)
    stop = free[0][3]
    out = engine.generate(PROMPTS, max_new_tokens=10, stop={stop})
    assert out[0] == free[0][:free[0].index(stop) + 1]  # ends at (and includes) the stop token
    for o, f in zip(out, free):
        assert o == f[:len(o)]
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        engine.generate([[1] * 120], max_new_tokens=20)
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[]], max_new_tokens=2)


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0]])
    gens = [torch.Generator().manual_seed(0)]
    assert sample(logits, gens, temperature=0.0, top_k=0, top_p=1.0).tolist() == [1]
    # a tiny nucleus keeps only the most likely token; top-k 2 never draws tokens 0 or 3
    assert all(sample(logits, gens, temperature=1.0, top_k=0, top_p=0.01).item() == 1 for _ in range(20))
    assert {sample(logits, gens, temperature=1.0, top_k=2, top_p=1.0).item() for _ in range(50)} == {1, 2}


def parallel_greedy(preset, layout):
    engine = Engine(cfg_of(preset), mesh=Mesh.build(layout), seed=0)
    return engine.generate(PROMPTS, max_new_tokens=10), engine.generate(PROMPTS, max_new_tokens=10,
                                                                        use_cache=False)


@pytest.mark.parametrize("preset, layout", [("gpt-tiny", Layout(tp=2)), ("llama-tiny", Layout(pp=2)),
                                            ("llama-tiny", Layout(tp=2, pp=2)), ("gpt-tiny", Layout(tp=2, pp=2))])
def test_parallel_greedy_equals_one_process(dist, preset, layout):
    torch.set_num_threads(1)
    ref = Engine(cfg_of(preset), mesh=Mesh.single(), seed=0).generate(PROMPTS, max_new_tokens=10)
    for cached, recomputed in dist(layout.world_size).run(parallel_greedy, preset, layout):
        assert cached == ref and recomputed == ref


def test_generate_command_under_tp_and_bert_fill_mask(tiny_dataset, tmp_path, capsys):
    from test_cli import tiny_args
    assert main(["train", *tiny_args(tiny_dataset, tmp_path / "gpt")]) == 0
    capsys.readouterr()
    args = ["generate", "--ckpt", str(tmp_path / "gpt"), "--max-new-tokens", "6", "--temperature", "0", "def f", "x"]
    assert main([*args, "--stats"]) == 0
    single = capsys.readouterr().out
    assert "tokens/s, time to first token" in single
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    proc = subprocess.run([sys.executable, "-m", "meshlm", *args, "--layout.tp", "2"], capture_output=True,
                          text=True, timeout=300, env=dict(env, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    completions = [line for line in single.splitlines() if "tokens/s" not in line]
    assert proc.stdout.splitlines() == completions  # tp=2 prints the same greedy completions

    assert main(["train", *tiny_args(tiny_dataset, tmp_path / "bert"), "--model", "bert-tiny"]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(tmp_path / "bert"), "def [MASK](self):"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "def [MASK](self):" and out[1].startswith("  [MASK] 1: ")
    assert main(["generate", "--ckpt", str(tmp_path / "bert"), "no mask here"]) == 2
