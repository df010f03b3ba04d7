"""Checkpoints: every rank writes its own slices; any layout reads back the slices it needs.

    out_dir/ckpt/step_000150/
        rank00000.safetensors   this rank's slices: 'p/<name>' parameters, 'm1/<name>', 'm2/<name>'
        rank00001.safetensors   AdamW moments, 'rng/torch' its RNG state; each key's slice of the
        ...                     global tensor in the file's metadata
        rank00000.json ...      what the rank wrote (keys, slices, sha256 of its file), written last
        tokenizer.json          so a checkpoint is self-contained for `meshlm generate`
        manifest.json           run config (model, layout), step, data position, optimizer step counts,
                                loss-scaler state, every tensor's global shape and where its pieces
                                are, and the sha256 of every file

A tensor that several ranks hold identically (a data-parallel replica, a weight replicated over tp)
is written once; a split one (a tp slice, one rank's experts, one stage's blocks) is written by each
owner as a piece: [start, stop) per dimension of the global (unpadded) tensor. Loading under another
layout reads, for each local parameter, the rectangle this rank needs from the pieces that overlap
it (safetensors reads slices without loading whole files), so a checkpoint of dp2 x tp2 loads at tp4,
pp2 x dp2, ZeRO-3 or in one process.

Atomic and background-safe: the ranks write into a temporary folder `.tmp-step_N-<attempt>`; each
rank's JSON appears only once its tensor file is complete, and rank 0 writes the manifest and renames
the folder into place once every rank's JSON is there. No collective is involved, so the writing
can run in a background thread while training goes on (`train.ckpt_async`). A crash mid-save leaves
only a temporary folder, which is never read. The newest `keep` checkpoints are kept.

Only safetensors and JSON are ever read: a checkpoint cannot run code. Every file's sha256 is
checked before it is used; a missing, truncated or altered file is a `CheckpointError` naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = 2

Slices = list[tuple[int, int]]
"""[start, stop) per dimension of the global tensor."""


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


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def whole(shape) -> Slices:
    return [(0, n) for n in shape]


# --- writing ----------------------------------------------------------------------------------------


class Snapshot:
    """What one rank writes for one checkpoint: its tensor pieces (already copied off the live model),
    and, on rank 0, the manifest fields. Built in the foreground; `write` needs no collective."""

    def __init__(self, *, root: Path, step: int, rank: int, world: int, attempt: str = "0"):
        self.root, self.step, self.rank, self.world = Path(root), step, rank, world
        self.attempt = attempt
        self.tensors: dict[str, torch.Tensor] = {}
        self.slices: dict[str, Slices] = {}
        self.shapes: dict[str, list[int]] = {}
        self.optim_steps: dict[str, float] = {}
        self.manifest: dict[str, Any] = {}
        """Rank 0 only: config, data position, extra state."""
        self.tokenizer: Path | None = None
        self.keep = 2

    def add(self, key: str, tensor: torch.Tensor, *, shape, slices: Slices | None = None) -> None:
        """A piece of global tensor `key` (global `shape`); slices None: the whole tensor."""
        self.tensors[key] = tensor.detach().to("cpu", copy=True).contiguous()
        self.slices[key] = [list(s) for s in (slices or whole(shape))]
        self.shapes[key] = list(shape)

    @property
    def tmp(self) -> Path:
        return self.root / f".tmp-{step_dir(self.root, self.step).name}-{self.attempt}"

    def write(self, *, timeout_s: float = 600.0) -> Path | None:
        """Write this rank's file and JSON; rank 0 then waits for every rank's and publishes the folder."""
        tmp = self.tmp
        tmp.mkdir(parents=True, exist_ok=True)
        name = rank_file(self.rank)
        save_file(self.tensors, tmp / name, metadata={"slices": json.dumps(self.slices)})
        record = {"rank": self.rank, "file": name, "sha256": _sha256(tmp / name), "slices": self.slices,
                  "shapes": self.shapes, "optim_steps": self.optim_steps}
        side = tmp / f"rank{self.rank:05d}.json"
        (tmp / (side.name + ".part")).write_text(json.dumps(record))
        os.replace(tmp / (side.name + ".part"), side)  # present only when complete
        if self.rank != 0:
            return None
        return self._publish(tmp, timeout_s)

    def _publish(self, tmp: Path, timeout_s: float) -> Path:
        sides = [tmp / f"rank{r:05d}.json" for r in range(self.world)]
        deadline = time.monotonic() + timeout_s
        while not all(s.is_file() for s in sides):
            if time.monotonic() > deadline:
                missing = [s.name for s in sides if not s.is_file()]
                raise CheckpointError(f"checkpoint {tmp}: ranks did not finish writing within {timeout_s:.0f} s "
                                      f"({', '.join(missing[:4])} missing)")
            time.sleep(0.02)
        records = [json.loads(s.read_text()) for s in sides]
        if self.tokenizer is not None and self.tokenizer.is_file():
            shutil.copyfile(self.tokenizer, tmp / "tokenizer.json")
        files = {r["file"]: r["sha256"] for r in records}
        files.update({s.name: _sha256(s) for s in sides})
        if (tmp / "tokenizer.json").is_file():
            files["tokenizer.json"] = _sha256(tmp / "tokenizer.json")
        tensors: dict[str, dict[str, Any]] = {}
        optim_steps: dict[str, float] = {}
        for r in records:
            optim_steps.update(r["optim_steps"])
            for key, sl in r["slices"].items():
                entry = tensors.setdefault(key, {"shape": r["shapes"][key], "pieces": []})
                entry["pieces"].append({"file": r["file"], "slices": sl})
        manifest = {"format": FORMAT, "step": self.step, "world": self.world, **self.manifest,
                    "optim_steps": optim_steps, "tensors": tensors, "sha256": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        final = step_dir(self.root, self.step)
        if final.exists():  # re-saving a step: the old copy goes only once the new one is complete
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(self.root)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


class BackgroundWriter:
    """At most one checkpoint being written at a time, in a thread; errors surface at the next wait."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.result: Path | None = None

    def submit(self, snap: Snapshot, *, background: bool) -> Path | None:
        self.wait()
        if not background:
            return snap.write()

        def run():
            try:
                self.result = snap.write()
            except BaseException as e:  # noqa: BLE001 - reported by wait()
                self.error = e

        self.thread = threading.Thread(target=run, name=f"meshlm-ckpt-{snap.step}", daemon=False)
        self.thread.start()
        return None

    def wait(self) -> Path | None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.result


def save(root: str | Path, *, step: int, params: dict[str, torch.Tensor],
         moments: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
         optim_steps: dict[str, float] | None = None, config: dict[str, Any],
         extra: dict[str, Any] | None = None, tokenizer: Path | None = None, keep: int = 2) -> Path:
    """One process's checkpoint of whole tensors (conversions, tools): the same format, one rank."""
    snap = Snapshot(root=Path(root), step=step, rank=0, world=1)
    for n, t in params.items():
        snap.add(f"p/{n}", t.float(), shape=t.shape)
    for n, (m1, m2) in (moments or {}).items():
        snap.add(f"m1/{n}", m1, shape=m1.shape)
        snap.add(f"m2/{n}", m2, shape=m2.shape)
    snap.optim_steps = dict(optim_steps or {})
    snap.manifest = {"config": config, "extra": extra or {}}
    snap.tokenizer, snap.keep = tokenizer, keep
    return snap.write()


# --- finding ----------------------------------------------------------------------------------------


def list_checkpoints(root: str | Path) -> list[Path]:
    """Published checkpoints under root (a manifest is there), oldest first; not yet checked for damage."""
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
    """The manifest; with verify, every file it lists is checked (present, sha256)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {folder}: unreadable manifest.json ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {folder}: format {manifest.get('format')!r} is not {FORMAT} "
                              "(written by another version of meshlm)")
    if verify:
        for name, digest in manifest["sha256"].items():
            f = folder / name
            if not f.is_file():
                raise CheckpointError(f"checkpoint {folder}: {name} is missing")
            if _sha256(f) != digest:
                raise CheckpointError(f"checkpoint {folder}: {name} is corrupt (sha256 mismatch)")
    return manifest


def newest_valid(root: Path, *, report=print) -> Path | None:
    """The newest checkpoint whose files all pass their checksums; damaged ones are reported and skipped."""
    for folder in reversed(list_checkpoints(root)):
        try:
            read_manifest(folder)
            return folder
        except CheckpointError as e:
            report(f"meshlm: skipping {e}; trying the previous checkpoint")
    return None


# --- reading ----------------------------------------------------------------------------------------


class Reader:
    """Reads any rectangle of any tensor of a checkpoint from the pieces that hold it."""

    def __init__(self, folder: str | Path, *, verify: bool = True):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, verify=verify)
        self.tensors: dict[str, dict[str, Any]] = self.manifest["tensors"]
        self._open: dict[str, Any] = {}

    def keys(self, prefix: str = "p/") -> list[str]:
        return [k[len(prefix):] for k in self.tensors if k.startswith(prefix)]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key]["shape"])

    def has(self, key: str) -> bool:
        return key in self.tensors

    def _file(self, name: str):
        if name not in self._open:
            try:
                self._open[name] = safe_open(str(self.folder / name), framework="pt")
            except Exception as e:  # a truncated or foreign file
                raise CheckpointError(f"checkpoint {self.folder}: {name} is unreadable ({e})") from None
        return self._open[name]

    def read(self, key: str, slices: Slices | None = None) -> torch.Tensor:
        """The rectangle `slices` of global tensor `key` (whole if None), from every piece overlapping it."""
        if key not in self.tensors:
            raise CheckpointError(f"checkpoint {self.folder}: no tensor {key!r}")
        shape = self.shape(key)
        want = slices or whole(shape)
        out, filled = None, 0
        for piece in self.tensors[key]["pieces"]:
            have = piece["slices"]
            lo = [max(a, c) for (a, _), (c, _) in zip(want, have)]
            hi = [min(b, d) for (_, b), (_, d) in zip(want, have)]
            if any(h <= low for low, h in zip(lo, hi)) and len(shape):
                continue
            src = self._file(piece["file"]).get_slice(key)
            part = src[tuple(slice(low - c, h - c) for low, h, (c, _) in zip(lo, hi, have))]
            if out is None:
                out = torch.empty([b - a for a, b in want], dtype=part.dtype)
            out[tuple(slice(low - a, h - a) for low, h, (a, _) in zip(lo, hi, want))] = part
            filled += part.numel()
        size = 1
        for a, b in want:
            size *= b - a
        if out is None or filled < size:
            raise CheckpointError(f"checkpoint {self.folder}: the pieces of {key!r} do not cover {want}")
        return out


def local_slices(p: torch.nn.Parameter, shape) -> tuple[Slices, int | None]:
    """The rectangle of the global (unpadded) tensor of `shape` that parameter p holds on this rank, and the
    dimension it is split along (None: whole). A tp slice of a padded vocabulary may end before its
    padded length, or hold padding only."""
    s = getattr(p, "meshlm_shard", None)
    sl = whole(shape)
    if s is None:
        return sl, None
    size = p.meshlm_full_shape[s.dim] // s.parts
    start = s.index * size
    sl[s.dim] = (min(start, shape[s.dim]), min(start + size, shape[s.dim]))  # the vocabulary padding is not saved
    return sl, s.dim


def read_local(reader: "Reader", key: str, p: torch.nn.Parameter, shape) -> torch.Tensor:
    """This rank's part of `key` in p's local shape (vocabulary padding zero), read from the pieces holding it."""
    sl, dim = local_slices(p, shape)
    out = torch.zeros(p.shape, dtype=p.dtype)
    if dim is None:
        return out.copy_(reader.read(key, sl))
    if sl[dim][1] > sl[dim][0]:
        t = reader.read(key, sl)
        out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def load(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """(params, moments, manifest): whole tensors by name, after checking every file's sha256."""
    r = Reader(folder)
    params = {n: r.read(f"p/{n}") for n in r.keys("p/")}
    moments = {n: (r.read(f"m1/{n}"), r.read(f"m2/{n}")) for n in r.keys("m1/")}
    return params, moments, r.manifest


def check_shapes(folder: Path, params: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Every parameter of `model` has a tensor of its (full) shape in `params`."""
    for n, p in model.named_parameters():
        if n not in params:
            raise CheckpointError(f"checkpoint {folder}: no tensor for parameter {n}")
        want = tuple(getattr(p, "meshlm_init_shape", p.shape))  # whole and unpadded
        if tuple(params[n].shape) != want:
            raise CheckpointError(
                f"checkpoint {folder}: {n} has shape {tuple(params[n].shape)}, the model wants {want}")
