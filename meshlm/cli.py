"""The `meshlm` command: train | launch | data prepare | generate | presets | ...

Bad input (an unknown setting, a wrong type, a layout that does not fit, a missing file or a corrupt
checkpoint) ends with one line `meshlm: error: ...` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from .config import PRESETS, ConfigError, param_count
from .layout import Layout, LayoutError, require_implemented, validate
from .train.checkpoint import CheckpointError

USER_ERRORS = (ConfigError, LayoutError, CheckpointError)  # DataError joins below (data.py imports lazily)


def _data_module():
    from . import data
    return data


# --- train --------------------------------------------------------------------------------------


def cmd_train(argv: list[str]) -> int:
    from .launch import (NODE_FLAGS_HELP, check_node_counts, launch_local, launch_nodes, parse_node_flags,
                         under_torchrun)
    from .settings import build_config, parse_overrides, settings_help

    if "-h" in argv or "--help" in argv:
        print("usage: meshlm train [--config RUN.toml] [--max-restarts N] [--dry-run] [--section.field VALUE ...]\n"
              "                    [--nodes N|MIN:MAX --rdzv HOST:PORT --node-rank R ...]\n")
        print("Train a model. With no arguments: a small GPT on the Python standard library, on this machine.")
        print("--max-restarts N: when a worker dies, restart the job (up to N times); it resumes from the newest")
        print("complete checkpoint (set --train.ckpt_every to save periodically).")
        print("--dry-run: plan the layout in this process (any size): per-rank shards, memory and schedule.\n")
        print("several machines (or run `torchrun --nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m meshlm "
              "train ...` yourself):")
        print(NODE_FLAGS_HELP + "\n")
        print(settings_help())
        return 0
    rest = list(argv)
    max_restarts = 0
    if "--max-restarts" in rest:  # the launcher's, not a setting: restart the job after a worker dies
        i = rest.index("--max-restarts")
        if i + 1 >= len(rest) or not rest[i + 1].isdigit():
            raise ConfigError("--max-restarts needs a non-negative integer")
        max_restarts = int(rest[i + 1])
        del rest[i:i + 2]
    nodes, rest = parse_node_flags(rest)  # several machines: the launcher's too
    launched = under_torchrun()
    if nodes is not None and launched:
        raise ConfigError("--nodes and the other node flags start a job; this process is already part of one "
                          "(torchrun's --nnodes and --rdzv-endpoint set them)")
    dry_run = "--dry-run" in rest  # plan the layout in this process: shapes on the meta device, no cluster
    if dry_run:
        rest.remove("--dry-run")
    config_file = _pop_config(rest)
    overrides = parse_overrides(rest)
    if nodes is not None and nodes.elastic and "train.elastic" not in overrides:  # dp follows the ranks that join
        overrides["train.elastic"] = "true"
        rest += ["--train.elastic", "true"]
    cfg = build_config(config_file=config_file, overrides=overrides)
    if dry_run:
        from .dryrun import main as dry_run_main
        return dry_run_main(cfg)

    # The layout is checked (pure, instant) before any data is prepared or process launched.
    validate(cfg.layout, cfg.model, batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len)
    require_implemented(cfg.layout)
    nproc = 0
    if nodes is not None:
        nproc = nodes.nproc(cfg.layout)
        check_node_counts(nodes, cfg.layout, nproc, model=cfg.model, batch_size=cfg.train.batch_size,
                          seq_len=cfg.train.seq_len)
        if nodes.max_nodes > 1 and not cfg.train.out_dir:
            raise ConfigError(f"train.out_dir must be given for a run over several nodes (--nodes {nodes.nnodes}): a "
                              "folder on a filesystem every node sees, where every rank writes its checkpoint pieces")
    from .train.precision import check_precision
    check_precision(cfg.train.precision, _train_device(cfg.train.device))
    data = _data_module()
    data_path = cfg.data.path or str(data.ensure_default_dataset(vocab_size=cfg.data.vocab_size,
                                                                  progress=not launched))
    from .train.trainer import resolve_vocab
    resolve_vocab(cfg, data.TokenDataset.open(data_path))  # the model must fit the tokenizer

    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "") if launched else ""
    default_dir = Path("runs") / (run_id if run_id not in ("", "none") else time.strftime("%Y%m%d-%H%M%S"))
    out_dir = cfg.train.out_dir or str(default_dir)  # under torchrun: the job's id, the same on every rank and node
    from .train.checkpoint import list_checkpoints
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0  # the trainer resumes by itself
    # (an elastic job's nodes may join while it runs: it continues its out_dir, see launch.join_job)
    if not cfg.train.resume and not restarted and not cfg.train.elastic and list_checkpoints(Path(out_dir) / "ckpt"):
        raise ConfigError(f"train.out_dir ({out_dir}) already holds checkpoints; pass --train.resume true "
                          "to continue them, or choose another out_dir")
    import dataclasses
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=out_dir),
                              data=dataclasses.replace(cfg.data, path=data_path))

    world = cfg.layout.world_size
    if launched or (world == 1 and not max_restarts and nodes is None):
        from .train.trainer import train
        train(cfg)
        return 0
    # Re-launch this command as `world` processes; pin the resolved out_dir and data so all ranks agree.
    worker_argv = (["train", *rest, "--train.out_dir", out_dir, "--data.path", data_path]
                   + (["--config", config_file] if config_file else []))
    if nodes is not None and nodes.rdzv:
        return launch_nodes(nodes, nproc, worker_argv, threads=cfg.train.threads, max_restarts=max_restarts)
    return launch_local(nproc or world, worker_argv, threads=cfg.train.threads, max_restarts=max_restarts)


def _pop_config(rest: list[str]) -> str | None:
    """Remove `--config FILE` from the arguments (in place) and return FILE, or None."""
    if "--config" not in rest:
        return None
    i = rest.index("--config")
    if i + 1 >= len(rest):
        raise ConfigError("--config needs a TOML file")
    config_file = rest[i + 1]
    del rest[i:i + 2]
    return config_file


def _train_device(kind: str):
    """The device a rank will train on (the same rule as the trainer's), for checks before launching."""
    import torch
    use_cuda = kind == "cuda" or (kind == "auto" and torch.cuda.is_available())
    return torch.device("cuda", 0) if use_cuda else torch.device("cpu")


# --- data ---------------------------------------------------------------------------------------


def cmd_data(argv: list[str]) -> int:
    data = _data_module()
    p = argparse.ArgumentParser(prog="meshlm data", description="Prepare token datasets.")
    sub = p.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="tokenise text files, folders or JSONL into a token file")
    prep.add_argument("inputs", nargs="*", help="text files, folders, or .jsonl with a 'text' field "
                                                "(default: the Python standard library source)")
    prep.add_argument("--out", required=True, help="output folder (tokens, tokenizer.json, meta.json)")
    prep.add_argument("--vocab-size", type=int, default=data.DEFAULT_VOCAB_SIZE,
                      help="vocabulary of the BPE tokenizer trained on the inputs")
    prep.add_argument("--tokenizer", default=None, help="use this tokenizer.json instead of training one")
    prep.add_argument("--val-fraction", type=float, default=0.005, help="share of tokens held out for validation")
    args = p.parse_args(argv)
    ds = data.prepare(inputs=args.inputs or None, out_dir=args.out, vocab_size=args.vocab_size,
                      tokenizer_path=args.tokenizer, val_fraction=args.val_fraction)
    print(f"meshlm: {args.out}: {len(ds.train):,} train + {len(ds.val):,} val tokens, vocabulary {ds.vocab_size}")
    return 0


# --- generate -----------------------------------------------------------------------------------


def cmd_generate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="meshlm generate",
                                description="Continue prompts from a checkpoint with a KV cache, batched, in one "
                                            "process or under --layout.tp / --layout.pp; on a BERT checkpoint, fill "
                                            "its [MASK] tokens.")
    p.add_argument("prompts", nargs="*", default=["def "], help="prompts to continue (default: 'def ')")
    p.add_argument("--ckpt", required=True, help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 for all")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set reaching p")
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    p.add_argument("--stats", action="store_true", help="print time to first token, tokens/s and per-token latency")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every token (a baseline)")
    p.add_argument("--layout.tp", dest="tp", type=int, default=1, help="tensor-parallel ranks")
    p.add_argument("--layout.pp", dest="pp", type=int, default=1, help="pipeline stages")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens ({args.max_new_tokens}) must be >= 1")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p ({args.top_p}) must be in (0, 1]")

    from .launch import launch_local, under_torchrun
    from .settings import RunConfig
    from .train import checkpoint

    folder = checkpoint.resolve(args.ckpt)
    manifest = checkpoint.read_manifest(folder, verify=False)  # the reader below checks every file once
    model_cfg = RunConfig.from_dict(manifest["config"]).model
    layout = Layout(tp=args.tp, pp=args.pp)
    validate(layout, model_cfg)
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"checkpoint {folder}: tokenizer.json is missing")
    if model_cfg.family == "bert":
        return _fill_mask(folder, model_cfg, args.prompts)
    if layout.world_size > 1 and not under_torchrun():
        return launch_local(layout.world_size, ["generate", *argv])

    import torch
    import torch.distributed as dist

    from .infer.engine import Engine

    if layout.world_size > 1:
        dist.init_process_group("gloo")
    try:
        engine = Engine.from_checkpoint(folder, layout=layout)
        tok = engine.tokenizer
        ids = [tok.encode(prompt).ids for prompt in args.prompts]
        for prompt, i in zip(args.prompts, ids):
            if not i:
                raise ConfigError(f"prompt {prompt!r} encodes to no tokens")
        torch.set_num_threads(max(1, torch.get_num_threads()))
        new = engine.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache,
                              stop={engine.eot_id} if engine.eot_id is not None else None)
        if engine.mesh.rank == 0:
            for prompt_ids, out in zip(ids, new):
                print(tok.decode(prompt_ids + out))
                print("-" * 40)
            if args.stats:
                st = engine.last_stats
                print(f"{len(ids)} prompts, {st['tokens']} new tokens in {st['seconds']:.2f} s: "
                      f"{st['tokens_per_s']:.1f} tokens/s, time to first token {1e3 * st['ttft_s']:.1f} ms, "
                      f"{st['per_token_ms']:.1f} ms per decode step ({'no cache' if args.no_cache else 'KV cache'}, "
                      f"{layout.describe()})")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _fill_mask(folder, model_cfg, texts: list[str]) -> int:
    """BERT: the top candidates for every [MASK] in each text."""
    import torch
    from tokenizers import Tokenizer

    from .infer.engine import fill_mask
    from .model import Transformer
    from .train import checkpoint

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    mask_id = tok.token_to_id("[MASK]") if tok.token_to_id("[MASK]") is not None else tok.token_to_id("<|mask|>")
    if mask_id is None:
        raise CheckpointError(f"checkpoint {folder}: its tokenizer has no mask token")
    mask_text = tok.id_to_token(mask_id)
    model = Transformer(model_cfg)
    reader = checkpoint.Reader(folder)  # checks every file's sha256
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(reader.read(f"p/{n}"))
    for text in texts:
        parts = text.split("[MASK]")
        ids: list[int] = []
        for i, part in enumerate(parts):
            ids += tok.encode(part).ids if part else []
            if i < len(parts) - 1:
                ids.append(mask_id)
        if mask_id not in ids:
            raise ConfigError(f"text {text!r} has no [MASK] to fill (write [MASK] where a token is missing)")
        cls_id, sep_id = (next((tok.token_to_id(t) for t in names if tok.token_to_id(t) is not None), None)
                          for names in (("<|cls|>", "[CLS]"), ("<|sep|>", "[SEP]")))
        if cls_id is not None and sep_id is not None:  # framed as in training
            ids = [cls_id, *ids, sep_id]
        print(text)
        for k, cands in enumerate(fill_mask(model, ids, mask_id=mask_id)):
            shown = ", ".join(f"{tok.decode([t])!r} {p:.2f}" for t, p in cands)
            print(f"  [MASK] {k + 1}: {shown}")
        print(f"  ({mask_text} is the model's mask token)")
    return 0


# --- schedule -----------------------------------------------------------------------------------


def cmd_schedule(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="meshlm schedule",
                                description="Check, cost and draw a pipeline schedule (no processes), "
                                            "or draw the measured schedule of a run.")
    p.add_argument("--pp", type=int, default=4, help="pipeline ranks")
    p.add_argument("--microbatches", type=int, default=8, help="micro-batches per step")
    p.add_argument("--schedule", default="1f1b", help="gpipe, 1f1b, interleaved or zb")
    p.add_argument("--vpp", type=int, default=1, help="chunks per rank (interleaved)")
    p.add_argument("--t-f", type=float, default=1.0, help="forward time of one stage")
    p.add_argument("--t-b", type=float, default=2.0, help="backward (input gradient) time")
    p.add_argument("--t-w", type=float, default=0.0, help="weight-gradient time (split out under zb)")
    p.add_argument("--run", default=None, help="a run folder: draw its measured pipeline_timeline.json instead")
    p.add_argument("--out", default=None, help="write the timeline picture (PNG) here")
    args = p.parse_args(argv)
    from .parallel import schedules

    if args.run:
        f = Path(args.run) / "pipeline_timeline.json"
        if not f.is_file():
            raise ConfigError(f"--run: {f} not found (only runs with pp > 1 write it)")
        import json
        timeline = schedules.Timeline.from_records(json.loads(f.read_text()))
        title = f"measured: {args.run}"
    else:
        try:
            table = schedules.build(args.schedule, p=args.pp, m=args.microbatches, v=args.vpp)
            schedules.check(table, p=args.pp, m=args.microbatches, v=args.vpp)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        timeline = schedules.simulate(table, t_f=args.t_f, t_b=args.t_b, t_w=args.t_w)
        title = f"{args.schedule}: pp {args.pp}, {args.microbatches} micro-batches" + \
            (f", v {args.vpp}" if args.vpp > 1 else "")
        formula = (args.pp - 1) / (args.microbatches + args.pp - 1)
        print(f"{title}: checked (dependencies, matching sends and receives, no deadlock)")
        print(f"  (p-1)/(m+p-1) = {formula:.3f}  (GPipe and 1F1B with t_w = 0, for comparison)")
    print(f"  bubble fraction {timeline.bubble:.3f}, makespan {timeline.makespan:.3g}")
    print(f"  peak micro-batches in flight per rank: {timeline.peak_in_flight}")
    if args.out:
        schedules.draw(timeline, args.out, title=title)
        print(f"  wrote {args.out}")
    return 0


# --- bench --------------------------------------------------------------------------------------


def cmd_bench(argv: list[str]) -> int:
    from .bench.run import main as bench_main
    return bench_main(argv)


# --- launch -------------------------------------------------------------------------------------


class _LaunchParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2 (by main), no usage dump
        raise ConfigError(f"launch: {message}")


def cmd_launch(argv: list[str]) -> int:
    """`meshlm launch slurm|k8s ... -- train ...`: write (or print) the scheduler's file; never submit it."""
    from .launch import parse_nodes, pytorchjob_manifest, sbatch_script

    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    else:
        train_args = []
    p = _LaunchParser(prog="meshlm launch",
                      description="Write an sbatch script (slurm) or a Kubeflow PyTorchJob manifest (k8s) that runs "
                                  "`torchrun ... -m meshlm train TRAIN_ARGS` on every node with torchrun's c10d "
                                  "rendezvous. The file is printed or written, never submitted.",
                      usage="meshlm launch {slurm,k8s} --nodes N[:MAX] --gpus-per-node G [options] -- train [ARGS]")
    p.add_argument("scheduler", choices=["slurm", "k8s"])
    p.add_argument("--nodes", required=True, help="nodes, or MIN:MAX for an elastic job (train.elastic)")
    p.add_argument("--gpus-per-node", type=int, required=True, help="ranks (GPUs) per node")
    p.add_argument("--out", default=None, help="write the file here (default: print it)")
    p.add_argument("--port", type=int, default=29500, help="port of the c10d rendezvous store")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a failure")
    p.add_argument("--rdzv-timeout", type=float, default=600.0, help="seconds for every node to join")
    p.add_argument("--job-name", default="meshlm", help="slurm: the job name; k8s: the PyTorchJob name")
    p.add_argument("--time", default="", help="slurm: time limit (e.g. 24:00:00)")
    p.add_argument("--partition", default="", help="slurm: partition")
    p.add_argument("--account", default="", help="slurm: account")
    p.add_argument("--cpus-per-task", type=int, default=0, help="slurm: CPU cores per node's task")
    p.add_argument("--image", default="", help="k8s: the container image with meshlm installed (required)")
    p.add_argument("--namespace", default="", help="k8s: namespace")
    p.add_argument("--pvc", default="", help="k8s: a PersistentVolumeClaim every pod mounts at /runs (for out_dir)")
    args = p.parse_args(argv)
    lo, hi = parse_nodes(args.nodes)
    for flag in ("gpus_per_node", "port", "max_restarts", "cpus_per_task"):
        value, low = getattr(args, flag), {"gpus_per_node": 1, "port": 1}.get(flag, 0)
        if value < low or (flag == "port" and value > 65535):
            raise ConfigError(f"--{flag.replace('_', '-')} ({value}) must be "
                              + ("in 1..65535" if flag == "port" else f">= {low}"))
    if not args.rdzv_timeout > 0:
        raise ConfigError(f"--rdzv-timeout ({args.rdzv_timeout:g}) must be > 0")
    if args.scheduler == "k8s" and not args.image:
        raise ConfigError("--image is required for k8s: a container image with meshlm installed")
    if args.scheduler == "k8s" and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?", args.job_name):
        raise ConfigError(f"--job-name ({args.job_name!r}) must be a Kubernetes name: lower-case letters, digits and "
                          "'-', at most 52 characters, starting and ending with a letter or digit")
    if train_args[:1] == ["train"]:
        train_args = train_args[1:]
    header = _check_launch(train_args, nodes=(lo, hi), gpus_per_node=args.gpus_per_node)
    if args.scheduler == "slurm":
        text = sbatch_script(nodes=args.nodes, gpus_per_node=args.gpus_per_node, train_args=train_args,
                             job_name=args.job_name, port=args.port, time_limit=args.time, partition=args.partition,
                             account=args.account, cpus_per_task=args.cpus_per_task, max_restarts=args.max_restarts,
                             rdzv_timeout=args.rdzv_timeout, header=header)
    else:
        text = pytorchjob_manifest(nodes=args.nodes, gpus_per_node=args.gpus_per_node, train_args=train_args,
                                   image=args.image, name=args.job_name, namespace=args.namespace, port=args.port,
                                   pvc=args.pvc, max_restarts=args.max_restarts, rdzv_timeout=args.rdzv_timeout,
                                   header=header)
    if args.out:
        Path(args.out).write_text(text)
        what = "sbatch script" if args.scheduler == "slurm" else "PyTorchJob manifest"
        submit = f"sbatch {args.out}" if args.scheduler == "slurm" else f"kubectl apply -f {args.out}"
        print(f"meshlm: wrote the {what} {args.out} ({hi} nodes x {args.gpus_per_node} GPUs); submit it with "
              f"`{submit}`")
        for line in header:
            print(f"  {line}")
    else:
        print(text, end="")
    return 0


def _check_launch(train_args: list[str], *, nodes: tuple[int, int], gpus_per_node: int) -> list[str]:
    """The training settings, checked here (before any job is queued) against every node count; the lines
    describing the job for the file's header. Warnings (tp across nodes, say) go to stderr."""
    from .launch import NodeSpec, check_node_counts, fit_layout
    from .mesh import Placement
    from .settings import build_config, parse_overrides

    rest = list(train_args)
    config_file = _pop_config(rest)
    overrides = parse_overrides(rest)
    if nodes[0] < nodes[1]:
        overrides.setdefault("train.elastic", "true")
    cfg = build_config(config_file=config_file, overrides=overrides)
    spec = NodeSpec(min_nodes=nodes[0], max_nodes=nodes[1], nproc_per_node=gpus_per_node)
    validate(cfg.layout, cfg.model, batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len)
    check_node_counts(spec, cfg.layout, gpus_per_node, model=cfg.model, batch_size=cfg.train.batch_size,
                      seq_len=cfg.train.seq_len)
    world = nodes[1] * gpus_per_node
    placement = Placement.contiguous(fit_layout(cfg.layout, world) if cfg.train.elastic else cfg.layout, gpus_per_node)
    for line in placement.warnings():
        print(f"meshlm: warning: {line}", file=sys.stderr)
    span = f"{nodes[0]} to {nodes[1]}" if nodes[0] < nodes[1] else str(nodes[1])
    return [f"{span} nodes x {gpus_per_node} GPUs, {cfg.preset}: {placement.describe()}"]


# --- presets ------------------------------------------------------------------------------------


def cmd_presets(argv: list[str]) -> int:
    print(f"{'preset':<14}{'family':<8}{'layers':>7}{'d_model':>8}{'heads':>6}{'kv':>4}{'d_ff':>7}{'params':>10}")
    for name, c in PRESETS.items():
        vocab = c.vocab_size or 8192
        n = param_count(c, vocab_size=vocab)["total"]
        print(f"{name:<14}{c.family:<8}{c.n_layers:>7}{c.d_model:>8}{c.n_heads:>6}{c.kv_heads:>4}{c.d_ff:>7}"
              f"{n / 1e6:>9.1f}M" + ("  (vocab from data; 8192 assumed)" if not c.vocab_size else ""))
    return 0


def cmd_ckpt(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="meshlm ckpt", description="Inspect a checkpoint: layout, step, tensors, "
                                "sizes; every file's checksum is verified.")
    p.add_argument("action", choices=["inspect"])
    p.add_argument("ckpt", help="a checkpoint folder, its ckpt/ folder or the run folder (the newest)")
    p.add_argument("--tensors", type=int, default=40, help="list at most this many tensors (default 40; 0: all)")
    args = p.parse_args(argv)
    from .train import checkpoint
    folder = checkpoint.resolve(args.ckpt)
    manifest = checkpoint.read_manifest(folder)  # verifies every file: CheckpointError names a bad one
    cfg = manifest.get("config", {})
    print(f"{folder}: step {manifest['step']}, written by {manifest['world']} rank(s) under "
          f"{manifest.get('layout', '?')}; model {cfg.get('preset', '?')}")
    total = 0
    rows = []
    for key, entry in manifest["tensors"].items():
        n = 1
        for d in entry["shape"]:
            n *= d
        total += n if key.startswith("p/") else 0
        rows.append((key, entry["shape"], len(entry["pieces"])))
    shown = rows if args.tensors == 0 else rows[:args.tensors]
    width = max(len(k) for k, _, _ in shown) if shown else 10
    for key, shape, pieces in shown:
        print(f"  {key:<{width}}  {str(tuple(shape)):<18} {pieces} piece{'s' if pieces > 1 else ''}")
    if len(shown) < len(rows):
        print(f"  ... {len(rows) - len(shown)} more (--tensors 0 lists all)")
    size = sum((folder / f).stat().st_size for f in manifest["sha256"])
    print(f"{sum(1 for k in manifest['tensors'] if k.startswith('p/'))} parameters ({total / 1e6:.2f}M values), "
          f"{len(manifest['sha256'])} files, {size / 1e6:.1f} MB; all checksums verified")
    return 0


def cmd_convert(argv: list[str]) -> int:
    from .convert import main as convert_main
    return convert_main(argv)


def cmd_serve(argv: list[str]) -> int:
    from .infer.server import main as serve_main
    return serve_main(argv)


def cmd_plan(argv: list[str]) -> int:
    from .plan.cli import main as plan_main
    return plan_main(argv)


def cmd_parity(argv: list[str]) -> int:
    from .parity import main as parity_main
    return parity_main(argv)


def cmd_doctor(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="meshlm doctor",
                                description="Name the ranks a hung run waited for, from its flight-recorder dumps.")
    p.add_argument("run_dir", help="the run's out_dir (holding flight/rank*.json)")
    from .diagnose import doctor
    return doctor(p.parse_args(argv).run_dir)


COMMANDS = {"train": cmd_train, "launch": cmd_launch, "doctor": cmd_doctor, "data": cmd_data, "generate": cmd_generate,
            "bench": cmd_bench, "schedule": cmd_schedule, "parity": cmd_parity, "ckpt": cmd_ckpt,
            "convert": cmd_convert, "plan": cmd_plan, "serve": cmd_serve, "presets": cmd_presets}

USAGE = """usage: meshlm COMMAND [ARGS]

commands:
  train      train a model (default: a small GPT on the Python standard library); --help lists every setting
  launch     launch slurm|k8s --nodes N --gpus-per-node G -- train ...: write an sbatch script or a PyTorchJob
  data       data prepare: tokenise text into a dataset folder
  generate   continue prompts from a checkpoint (KV cache, batched, --layout.tp/pp); BERT: fill [MASK]
  serve      an OpenAI-style /v1/completions server for a checkpoint (127.0.0.1 by default)
  bench      run strategies (single, dp, ZeRO, PS, torch DDP/FSDP2) side by side; --help for the options
  schedule   check, cost and draw a pipeline schedule (or a run's measured one)
  plan       predict step time and memory of layouts on any cluster, and search for the best one
  parity     the golden loss-parity suite: one config under many layouts, every curve against one process
  ckpt       ckpt inspect CKPT: layout, step, tensors and sizes of a checkpoint; checksums verified
  convert    --from-hf DIR / --to-hf CKPT: Hugging Face GPT-2, Llama and BERT checkpoints (safetensors)
  presets    list the model presets
  doctor     doctor RUN_DIR: which rank a hung run waited for, from its flight-recorder dumps
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"meshlm: error: unknown command {cmd!r}; commands are {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    errors = USER_ERRORS + (_data_module().DataError,)
    try:
        return COMMANDS[cmd](rest)
    except errors as e:
        print(f"meshlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meshlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
