"""Text -> tokens -> batches.

Three layers, read top to bottom:

1. Corpus: where text comes from (files, folders, .jsonl, or the Python standard
   library of the running interpreter, which exists on every machine and so makes
   a zero-download default).
2. Dataset: a byte-level BPE tokenizer and the token stream, prepared once into a
   folder (tokenizer.json, train.bin, val.bin, meta.json) and memory-mapped after.
3. Batches: causal-LM and BERT masked-LM batches for one data-parallel rank.

Batches are a pure function of (seed, step): the *global* batch is drawn from a
generator seeded by those two numbers and each rank slices out its rows. So the
union over ranks equals the single-process batch whatever the parallel layout,
and a resumed run sees exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

DEFAULT_VOCAB_SIZE = 8192
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|mask|>", "<|cls|>", "<|sep|>"]
"""Ids 0..4 in this order in every tokenizer we train, so models can hard-code them."""

_FORMAT = 1
_EXCLUDED_STDLIB_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3"})
_ENCODE_CHUNK_DOCS = 256  # documents per encode_batch call: big enough to use every core


class DataError(ValueError):
    """Bad input, described in one line naming the path, field or value at fault.

    The CLI prints the message and exits with status 2, so it must make sense on its own.
    """


# ----------------------------------------------------------------------------- corpus


def default_corpus() -> list[Path]:
    """The *.py files of the running interpreter's standard library, sorted.

    Tests, idlelib, lib2to3 and site-packages are left out: they are repetitive or
    not ours. About 11 MB of real code on Python 3.11, present wherever Python is,
    so training works with no download.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(path for path in root.rglob("*.py")
                  if path.is_file() and not _EXCLUDED_STDLIB_DIRS.intersection(path.relative_to(root).parts[:-1]))


def iter_documents(inputs: Sequence[str | Path]) -> Iterator[str]:
    """Yield one document per text file, per .jsonl line, per file inside a folder.

    Folders are walked recursively in sorted order (so the token stream is
    reproducible); files that are not UTF-8 text are binary and skipped silently.
    Empty documents are skipped: they would only add separators.
    """
    for item in [inputs] if isinstance(inputs, (str, Path)) else inputs:  # a lone path is not a list of characters
        path = Path(item)
        if not path.exists():
            raise DataError(f"input not found: {path}")
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                if file.suffix == ".jsonl":
                    yield from _iter_jsonl(file)
                elif (text := _read_text(file)) is not None and text:
                    yield text
        elif path.suffix == ".jsonl":
            yield from _iter_jsonl(path)
        else:
            text = _read_text(path)
            if text is None:
                raise DataError(f"input is not UTF-8 text: {path}")
            if text:
                yield text


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is binary (not UTF-8, or holds a NUL byte)."""
    data = path.read_bytes()
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _iter_jsonl(path: Path) -> Iterator[str]:
    """The "text" field of each line; blank lines are allowed, anything else is an error."""
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f'{path}:{line_no}: line has no string "text" field')
            if text:
                yield text


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(documents: Iterable[str], *, vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style: Radford et al. 2019).

    Byte-level means every byte has a token, so any text encodes and decodes back
    exactly: no unknown token, no normalisation. SPECIAL_TOKENS come first and get
    ids 0..4. A small corpus may stop short of vocab_size (nothing left to merge).
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise DataError(f"vocab_size ({vocab_size}) must be at least {minimum} (256 bytes + special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def _load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer.json and check it puts SPECIAL_TOKENS at ids 0..4, as models assume."""
    if not path.is_file():
        raise DataError(f"tokenizer not found: {path}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a bad file
        raise DataError(f"cannot read tokenizer {path}: {e}") from None
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if (found := tokenizer.token_to_id(token)) != expected_id:
            raise DataError(f"tokenizer {path}: special token {token} must have id {expected_id}, has {found}")
    return tokenizer


# ----------------------------------------------------------------------------- dataset


def prepare(*, inputs: Sequence[str | Path] | None, out_dir: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE,
            tokenizer_path: str | Path | None = None, val_fraction: float = 0.005, progress: bool = True
            ) -> TokenDataset:
    """Tokenise text into a dataset folder (replacing any dataset already there).

    inputs=None means default_corpus(). The folder holds tokenizer.json, train.bin
    and val.bin (raw uint16 tokens, uint32 above 65536 ids) and meta.json.
    Documents are joined with <|endoftext|> between them; the last val_fraction of
    the stream (at least one token) is the validation split.
    """
    return _prepare(inputs=inputs, out_dir=Path(out_dir), vocab_size=vocab_size, tokenizer_path=tokenizer_path,
                    val_fraction=val_fraction, progress=progress, replace=True)


def _prepare(*, inputs: Sequence[str | Path] | None, out_dir: Path, vocab_size: int, tokenizer_path: str | Path | None,
             val_fraction: float, progress: bool, replace: bool) -> TokenDataset:
    """prepare(), with a choice of what to do when out_dir appeared meanwhile.

    Everything is written to a hidden temporary folder next to out_dir and renamed
    into place at the end: an interrupted run never leaves half a dataset, and an
    existing dataset survives until the new one is complete. replace=False keeps
    the existing one (a concurrent process won the race to prepare the same data).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction ({val_fraction}) must be in (0, 1)")
    inputs = default_corpus() if inputs is None else [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if next(iter_documents(inputs), None) is None:
        shown = ", ".join(map(str, inputs[:3])) + (f" and {len(inputs) - 3} more" if len(inputs) > 3 else "")
        raise DataError(f"empty corpus: no text documents in {shown or 'the inputs (none given)'}")
    is_ours_or_empty = (out_dir / "meta.json").is_file() or (out_dir.is_dir() and not any(out_dir.iterdir()))
    if out_dir.exists() and not is_ours_or_empty:  # never replace a folder that is not a dataset of ours
        raise DataError(f"out_dir exists and is not a meshlm dataset: {out_dir}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache must be readable
        if tokenizer_path is None:
            docs = tqdm(iter_documents(inputs), desc="training tokenizer", unit="doc", disable=not progress)
            tokenizer = train_tokenizer(docs, vocab_size=vocab_size)
        else:
            tokenizer = _load_tokenizer(Path(tokenizer_path))
        tokenizer.save(str(tmp / "tokenizer.json"))
        n_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        dtype = np.uint16 if n_vocab <= 2**16 else np.uint32
        n_docs, n_tokens = _write_token_stream(tokenizer, iter_documents(inputs), path=tmp / "train.bin",
                                               dtype=dtype, progress=progress)
        if n_tokens < 2:
            raise DataError(f"corpus too small: {n_tokens} token(s), need at least 2 for a train/val split")
        n_val = min(max(math.ceil(n_tokens * val_fraction), 1), n_tokens - 1)
        _split_tail(tmp / "train.bin", tmp / "val.bin", n_tail=n_val, dtype=dtype)
        meta = {
            "format": _FORMAT, "vocab_size": n_vocab, "dtype": np.dtype(dtype).name,
            "n_train": n_tokens - n_val, "n_val": n_val, "n_documents": n_docs, "val_fraction": val_fraction,
            "eot_id": 0, "special_tokens": SPECIAL_TOKENS,
            "tokenizer": "trained" if tokenizer_path is None else str(Path(tokenizer_path).resolve()),
            "inputs": [str(Path(p).resolve()) for p in inputs],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        _move_into_place(tmp, out_dir, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return TokenDataset.open(out_dir)


def _write_token_stream(tokenizer: Tokenizer, documents: Iterable[str], *, path: Path, dtype: type,
                        progress: bool) -> tuple[int, int]:
    """Encode documents in chunks (encode_batch runs on every core) and append them to path.

    A literal "<|endoftext|>" inside a document is encoded as plain text, so the
    only end-of-text ids in the stream are the document boundaries we insert.
    Returns (documents, tokens) written.
    """
    eot = np.array([0], dtype=dtype)
    n_docs = n_tokens = 0
    tokenizer.encode_special_tokens = True  # not saved in tokenizer.json
    try:
        with path.open("wb") as f, tqdm(desc="tokenizing", unit="doc", disable=not progress) as bar:
            docs = iter(documents)
            while chunk := list(itertools.islice(docs, _ENCODE_CHUNK_DOCS)):
                for encoding in tokenizer.encode_batch(chunk):
                    if n_docs > 0:
                        eot.tofile(f)
                        n_tokens += 1
                    np.asarray(encoding.ids, dtype=dtype).tofile(f)
                    n_docs, n_tokens = n_docs + 1, n_tokens + len(encoding.ids)
                bar.update(len(chunk))
                bar.set_postfix(tokens=n_tokens)
    finally:
        tokenizer.encode_special_tokens = False
    return n_docs, n_tokens


def _split_tail(src: Path, dst: Path, *, n_tail: int, dtype: type) -> None:
    """Move the last n_tail tokens of src into dst, without copying the (large) head."""
    itemsize = np.dtype(dtype).itemsize
    keep_bytes = src.stat().st_size - n_tail * itemsize
    with src.open("r+b") as f:
        f.seek(keep_bytes)
        dst.write_bytes(f.read())
        f.truncate(keep_bytes)


def _move_into_place(tmp: Path, out_dir: Path, *, replace: bool) -> None:
    """Rename the finished tmp folder to out_dir.

    rename() of a folder onto a non-empty folder fails atomically, which is what
    replace=False relies on. To replace, the old dataset is first renamed aside
    (processes that memory-mapped its files keep reading them) and removed last.
    """
    try:
        os.rename(tmp, out_dir)
        return
    except OSError:
        if not out_dir.is_dir():
            raise
        if not replace:
            return  # another process finished first; its dataset is as good as ours
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, old / "data")
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.rename(old / "data", out_dir)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


class TokenDataset:
    """A prepared dataset folder: tokenizer plus memory-mapped train/val token streams.

    Memory-mapping means opening is instant and many processes share one copy of
    the tokens in the page cache.
    """

    def __init__(self, *, path: Path, tokenizer: Tokenizer, meta: dict, train: np.memmap, val: np.memmap) -> None:
        self.path = path
        self.tokenizer = tokenizer
        self.meta = meta
        self.train = train
        self.val = val
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eot_id, self.pad_id, self.mask_id, self.cls_id, self.sep_id = range(len(SPECIAL_TOKENS))

    @classmethod
    def open(cls, path: str | Path) -> TokenDataset:
        """Open a folder written by prepare(); anything missing or inconsistent is a DataError."""
        path = Path(path)
        if not path.is_dir():
            raise DataError(f"dataset folder not found: {path}")
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"not a meshlm dataset (no meta.json): {path}")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_path}: invalid JSON ({e.msg})") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise DataError(f"{meta_path}: format is {found!r}, expected {_FORMAT}")
        if missing := [key for key in ("dtype", "n_train", "n_val") if key not in meta]:
            raise DataError(f"{meta_path}: missing field(s) {', '.join(missing)}")
        tokenizer = _load_tokenizer(path / "tokenizer.json")
        splits = {name: _open_split(path / f"{name}.bin", dtype=meta["dtype"], length=meta[f"n_{name}"])
                  for name in ("train", "val")}
        return cls(path=path, tokenizer=tokenizer, meta=meta, **splits)

    def encode(self, text: str) -> list[int]:
        """Token ids of text (special-token strings in it become their ids)."""
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids, special tokens included, so decode(encode(s)) == s."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return (f"TokenDataset({str(self.path)!r}, vocab_size={self.vocab_size}, "
                f"train={len(self.train):,}, val={len(self.val):,})")


def _open_split(path: Path, *, dtype: str, length: int) -> np.memmap:
    """Memory-map one split, checking its size matches meta.json (catches truncated copies)."""
    expected = length * np.dtype(dtype).itemsize
    actual = path.stat().st_size if path.is_file() else None
    if actual != expected:
        raise DataError(f"{path}: expected {expected} bytes ({length} tokens), found {actual}")
    return np.memmap(path, dtype=dtype, mode="r", shape=(length,))


def cache_dir() -> Path:
    """Where prepared datasets are kept: $MESHLM_CACHE, else ~/.cache/meshlm."""
    return Path(os.environ.get("MESHLM_CACHE") or Path.home() / ".cache" / "meshlm").expanduser()


def ensure_default_dataset(*, vocab_size: int = DEFAULT_VOCAB_SIZE, progress: bool = True) -> Path:
    """The prepared default corpus (this Python's stdlib), preparing it on first use.

    Every rank of a job may call this at once: each prepares into its own temporary
    folder and only the first rename wins; the others discard theirs and use it.
    """
    path = cache_dir() / "data" / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-v{vocab_size}"
    if not (path / "meta.json").is_file():
        print(f"meshlm: preparing the default corpus (Python standard library, vocab {vocab_size}) in {path}",
              file=sys.stderr, flush=True)
        _prepare(inputs=None, out_dir=path, vocab_size=vocab_size, tokenizer_path=None,
                 val_fraction=0.005, progress=progress, replace=False)
    return path


# ----------------------------------------------------------------------------- batches


def _batch_generator(*, seed: int, step: int) -> torch.Generator:
    """A generator seeded from (seed, step) alone, via splitmix64 (Steele et al. 2014).

    Python's hash() is salted per process, so it would give each rank different batches.
    """
    def splitmix64(x: int) -> int:
        mask = 2**64 - 1
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    generator = torch.Generator()
    generator.manual_seed(splitmix64(splitmix64(seed & (2**64 - 1)) ^ (step & (2**64 - 1))))
    return generator


def _local_rows(*, n_tokens: int, window: int, seq_len: int, global_batch: int, data_rank: int,
                data_world: int) -> slice:
    """Validate batch arguments; return this rank's rows of the global batch."""
    if data_world < 1 or not 0 <= data_rank < data_world:
        raise DataError(f"data_rank ({data_rank}) must be in [0, data_world) with data_world ({data_world}) >= 1")
    if global_batch < 1 or global_batch % data_world != 0:
        raise DataError(f"global_batch ({global_batch}) must be a positive multiple of data_world ({data_world})")
    if n_tokens < window:
        raise DataError(f"token stream ({n_tokens} tokens) is shorter than one window "
                        f"({window} tokens for seq_len {seq_len})")
    local = global_batch // data_world
    return slice(data_rank * local, (data_rank + 1) * local)


def _windows(tokens: np.ndarray, starts: torch.Tensor, *, length: int) -> torch.Tensor:
    """Rows tokens[s : s+length] for each start s, as int64."""
    index = starts.numpy()[:, None] + np.arange(length)  # (B, length)
    return torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))


def lm_batch(tokens: np.ndarray, *, step: int, seq_len: int, global_batch: int, data_rank: int, data_world: int,
             seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM batch (x, y) for one data-parallel rank; y is x shifted left by one token.

    Windows start at uniform random offsets (not a fixed chunking), drawn for the
    whole global batch from (seed, step); this rank keeps its slice of rows.
    """
    if seq_len < 1:
        raise DataError(f"seq_len ({seq_len}) must be >= 1")
    rows = _local_rows(n_tokens=len(tokens), window=seq_len + 1, seq_len=seq_len, global_batch=global_batch,
                       data_rank=data_rank, data_world=data_world)
    generator = _batch_generator(seed=seed, step=step)
    starts = torch.randint(0, len(tokens) - seq_len, (global_batch,), generator=generator)
    chunk = _windows(tokens, starts[rows], length=seq_len + 1)  # (B_local, T+1)
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def mlm_batch(tokens: np.ndarray, *, step: int, seq_len: int, global_batch: int, data_rank: int, data_world: int,
              seed: int, cls_id: int, sep_id: int, mask_id: int, vocab_size: int, n_special: int = len(SPECIAL_TOKENS),
              mask_prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BERT masked-LM batch (Devlin et al. 2019): (input_ids, labels, token_type_ids).

    Row = [cls] + window of seq_len-2 tokens + [sep]. Of the window positions,
    mask_prob are chosen (at least one per row, so no row has an empty loss):
    80% of those become mask_id, 10% a random non-special id, 10% stay as they are
    (so the model cannot assume an unmasked token is always correct). labels hold
    the original id at chosen positions and -100 (ignored by cross_entropy) elsewhere.
    """
    if seq_len < 3:
        raise DataError(f"seq_len ({seq_len}) must be >= 3 to hold [cls], one token and [sep]")
    if not 0.0 < mask_prob <= 1.0:
        raise DataError(f"mask_prob ({mask_prob}) must be in (0, 1]")
    if not 0 <= n_special < vocab_size:
        raise DataError(f"n_special ({n_special}) must be in [0, vocab_size ({vocab_size}))")
    width = seq_len - 2
    rows = _local_rows(n_tokens=len(tokens), window=width, seq_len=seq_len, global_batch=global_batch,
                       data_rank=data_rank, data_world=data_world)
    # Draw everything for the global batch, in a fixed order, then slice: layout-independent.
    generator = _batch_generator(seed=seed, step=step)
    starts = torch.randint(0, len(tokens) - width + 1, (global_batch,), generator=generator)
    choose_score = torch.rand(global_batch, width, generator=generator)
    action = torch.rand(global_batch, width, generator=generator)
    random_ids = torch.randint(n_special, vocab_size, (global_batch, width), generator=generator)

    chosen = choose_score < mask_prob  # (B, W)
    chosen[torch.arange(global_batch), choose_score.argmin(dim=1)] = True  # at least one per row
    chosen, action, random_ids = chosen[rows], action[rows], random_ids[rows]

    original = _windows(tokens, starts[rows], length=width)  # (B_local, W)
    window = original.clone()
    window[chosen & (action < 0.8)] = mask_id
    randomise = chosen & (action >= 0.8) & (action < 0.9)
    window[randomise] = random_ids[randomise]

    input_ids = torch.full((original.shape[0], seq_len), sep_id, dtype=torch.int64)  # (B_local, T)
    input_ids[:, 0], input_ids[:, 1:-1] = cls_id, window
    labels = torch.full_like(input_ids, -100)  # -100: ignored by cross_entropy
    labels[:, 1:-1] = torch.where(chosen, original, -100)
    return input_ids, labels, torch.zeros_like(input_ids)


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Move a batch to the training device; on a GPU without making the host wait.

    A copy from ordinary (pageable) host memory is staged by the driver and returns only when done; a
    copy from page-locked (pinned) memory is a DMA the GPU runs on its own, so with non_blocking=True
    the host goes on queueing the step's kernels meanwhile (the copy is ordered before them on the
    stream). The batch is built on the host while the GPU still runs the previous step (the step has no
    host synchronisation), so loading overlaps computation without a loader process. The pinned buffer
    comes from PyTorch's caching host allocator and is not written again before the copy completes.
    """
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tuple(t.to(device) for t in tensors)
