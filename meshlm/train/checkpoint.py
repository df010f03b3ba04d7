"""Checkpoints: a folder of safetensors files and one JSON manifest; nothing is ever unpickled.

    out_dir/ckpt/step_000150/
        model.safetensors      parameters by their global names (fp32)
        optim.safetensors      AdamW moments, '<name>.exp_avg' and '<name>.exp_avg_sq'
        tokenizer.json         the tokenizer, so a checkpoint is self-contained for `meshlm generate`
        manifest.json          run config, step, optimizer step counts, sha256 of every file

A checkpoint is written into a temporary folder and renamed into place when complete, so a crash
mid-save never leaves a half checkpoint under a real name, and older checkpoints are deleted only
after the new one exists. This simple format holds data-parallel runs, where rank 0 has every
parameter; checkpoints that reshard across layouts build on it later.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupt; the message names the path."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def save(root: str | Path, *, step: int, params: dict[str, torch.Tensor],
         moments: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
         optim_steps: dict[str, float] | None = None, config: dict[str, Any],
         extra: dict[str, Any] | None = None, tokenizer: Path | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step` under root atomically; keep the newest `keep`. Returns its folder.

    params: full tensors by global parameter name; moments: AdamW (exp_avg, exp_avg_sq) by the same
    names; optim_steps: AdamW's step count per name. Whatever the layout that trained them, these
    are whole tensors, so the checkpoint loads under any data-parallel layout and ZeRO stage.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    save_file({n: t.detach().float().cpu().contiguous() for n, t in params.items()}, tmp / "model.safetensors")
    if moments:
        flat = {}
        for n, (m1, m2) in moments.items():
            flat[f"{n}.exp_avg"] = m1.detach().cpu().contiguous()
            flat[f"{n}.exp_avg_sq"] = m2.detach().cpu().contiguous()
        save_file(flat, tmp / "optim.safetensors")
    if tokenizer is not None and tokenizer.is_file():
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    files = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
    manifest = {"format": FORMAT, "step": step, "config": config, "optim_steps": optim_steps or {},
                "extra": extra or {}, "sha256": files}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))

    if final.exists():  # re-saving the same step: the old copy goes only once the new one is complete
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and (p / "manifest.json").is_file())


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a ckpt/ folder or a run folder (its newest)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    for root in (path, path / "ckpt"):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    raise CheckpointError(f"no checkpoint in {path} (expected manifest.json, or ckpt/step_*/manifest.json)")


def read_manifest(folder: Path, *, verify: bool = True) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {folder}: unreadable manifest.json ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {folder}: format {manifest.get('format')!r} is not {FORMAT}")
    if verify:
        for name, digest in manifest["sha256"].items():
            f = folder / name
            if not f.is_file():
                raise CheckpointError(f"checkpoint {folder}: {name} is missing")
            if _sha256(f) != digest:
                raise CheckpointError(f"checkpoint {folder}: {name} is corrupt (sha256 mismatch)")
    return manifest


def load(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """(params, moments, manifest) of a checkpoint, after checking every file's sha256."""
    manifest = read_manifest(folder)
    params = load_file(folder / "model.safetensors")
    moments = {}
    if (folder / "optim.safetensors").is_file():
        flat = load_file(folder / "optim.safetensors")
        moments = {n: (flat[f"{n}.exp_avg"], flat[f"{n}.exp_avg_sq"]) for n in manifest["optim_steps"]}
    return params, moments, manifest


def check_shapes(folder: Path, params: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Every parameter of `model` has a tensor of its (full) shape in `params`."""
    for n, p in model.named_parameters():
        if n not in params:
            raise CheckpointError(f"checkpoint {folder}: no tensor for parameter {n}")
        want = tuple(getattr(p, "meshlm_init_shape", p.shape))  # whole and unpadded
        if tuple(params[n].shape) != want:
            raise CheckpointError(
                f"checkpoint {folder}: {n} has shape {tuple(params[n].shape)}, the model wants {want}")
