"""Tests for meshlm.data: corpus reading, dataset preparation, and batch determinism.

Tiny corpora written into tmp_path keep the whole file fast (no default-corpus
tokenisation here; that is timed separately).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import meshlm.data
from meshlm.data import (
    DEFAULT_VOCAB_SIZE,
    SPECIAL_TOKENS,
    DataError,
    TokenDataset,
    cache_dir,
    default_corpus,
    ensure_default_dataset,
    iter_documents,
    lm_batch,
    mlm_batch,
    prepare,
    train_tokenizer,
)

VOCAB = 400

FOLDER_DOCS = {  # relative path -> text; sorted order is the document order
    "a.py": "def add(x, y):\n    return x + y\n",
    "sub/b.md": "# Notes\nUnicode survives: héllo, 日本語, emoji 🙂.\n",
    "sub/c.txt": "A literal <|endoftext|> inside text stays text.\n",
}
JSONL_DOCS = ["first json document", "second one\nwith two lines"]
TXT_DOC = "plain text file, the last document.\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[str]]:
    """A folder (with a binary file to skip), a .jsonl and a .txt; and the documents they hold, in order."""
    root = tmp_path_factory.mktemp("corpus")
    for rel, text in FOLDER_DOCS.items():
        (root / "folder" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "folder" / rel).write_text(text, encoding="utf-8")
    (root / "folder" / "image.bin").write_bytes(bytes(range(256)))  # not UTF-8: skipped
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(JSONL_DOCS)]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n\n")  # a trailing blank line is allowed
    (root / "last.txt").write_text(TXT_DOC, encoding="utf-8")
    inputs = [root / "folder", root / "docs.jsonl", root / "last.txt"]
    return inputs, [*FOLDER_DOCS.values(), *JSONL_DOCS, TXT_DOC]


@pytest.fixture(scope="module")
def dataset(corpus: tuple[list[Path], list[str]], tmp_path_factory: pytest.TempPathFactory) -> TokenDataset:
    inputs, _ = corpus
    return prepare(inputs=inputs, out_dir=tmp_path_factory.mktemp("ds") / "data", vocab_size=VOCAB,
                   val_fraction=0.1, progress=False)


@pytest.fixture(scope="module")
def stream() -> np.ndarray:
    """A synthetic token stream whose values equal their positions, so windows are easy to check."""
    return np.arange(5000, dtype=np.uint16)


# ----------------------------------------------------------------------------- corpus


def test_default_corpus_is_stdlib_python() -> None:
    files = default_corpus()
    assert len(files) > 100
    assert all(f.suffix == ".py" and f.is_file() for f in files)
    assert files == sorted(files)
    assert not any({"site-packages", "test", "tests", "idlelib", "lib2to3"} & set(f.parts) for f in files)


def test_iter_documents_order_and_binary_skip(corpus: tuple[list[Path], list[str]]) -> None:
    inputs, docs = corpus
    assert list(iter_documents(inputs)) == docs
    assert list(iter_documents(str(inputs[-1]))) == [TXT_DOC]  # a lone path, not its characters


def test_missing_input_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=f"input not found: {missing}"):
        list(iter_documents([missing]))


def test_jsonl_line_without_text_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=rf'{path}:2: .*"text"'):
        list(iter_documents([path]))


# ----------------------------------------------------------------------------- prepare


def test_prepare_writes_dataset(dataset: TokenDataset, corpus: tuple[list[Path], list[str]]) -> None:
    inputs, docs = corpus
    for name in ("tokenizer.json", "train.bin", "val.bin", "meta.json"):
        assert (dataset.path / name).is_file()
    meta = json.loads((dataset.path / "meta.json").read_text())
    assert meta["format"] == 1 and meta["eot_id"] == 0 and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == dataset.vocab_size <= VOCAB
    assert meta["n_documents"] == len(docs)
    assert meta["inputs"] == [str(p.resolve()) for p in inputs]
    assert meta["n_train"] == len(dataset.train) and meta["n_val"] == len(dataset.val) >= 1
    assert dataset.train.dtype == np.uint16 and dataset.val.dtype == np.uint16
    assert (dataset.path / "train.bin").stat().st_size == 2 * meta["n_train"]


def test_prepare_round_trips_text_with_eot_between_documents(dataset: TokenDataset,
                                                            corpus: tuple[list[Path], list[str]]) -> None:
    _, docs = corpus
    ids = np.concatenate([dataset.train, dataset.val]).tolist()
    # One <|endoftext|> id per boundary: the literal one in sub/c.txt was encoded as plain text.
    assert ids.count(dataset.eot_id) == len(docs) - 1
    pieces = [dataset.decode(piece) for piece in _split(ids, dataset.eot_id)]
    assert pieces == docs
    assert dataset.decode(ids) == "<|endoftext|>".join(docs)


def _split(ids: list[int], sep: int) -> list[list[int]]:
    out: list[list[int]] = [[]]
    for i in ids:
        out.append([]) if i == sep else out[-1].append(i)
    return out


def test_special_tokens_have_ids_0_to_4(dataset: TokenDataset) -> None:
    assert [dataset.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (dataset.eot_id, dataset.pad_id, dataset.mask_id, dataset.cls_id, dataset.sep_id) == (0, 1, 2, 3, 4)
    assert dataset.encode("<|mask|>") == [2]


def test_reopen_matches(dataset: TokenDataset) -> None:
    again = TokenDataset.open(dataset.path)
    assert np.array_equal(again.train, dataset.train) and again.meta == dataset.meta


def test_prepare_with_tokenizer_path_reuses_it(dataset: TokenDataset, tmp_path: Path) -> None:
    text = tmp_path / "other.txt"
    text.write_text("completely different words for a second corpus\n")
    other = prepare(inputs=[text], out_dir=tmp_path / "other", vocab_size=300,
                    tokenizer_path=dataset.path / "tokenizer.json", progress=False)
    assert other.tokenizer.get_vocab() == dataset.tokenizer.get_vocab()
    assert other.vocab_size == dataset.vocab_size  # the loaded tokenizer wins over vocab_size
    sample = "def add(x, y): return héllo"
    assert other.encode(sample) == dataset.encode(sample)
    assert other.meta["tokenizer"] == str((dataset.path / "tokenizer.json").resolve())


def test_prepare_replaces_existing_dataset(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("first version of the corpus\n")
    (tmp_path / "two.txt").write_text("second, rather longer, version of the corpus text\n")
    first = prepare(inputs=[tmp_path / "one.txt"], out_dir=tmp_path / "ds", vocab_size=300, progress=False)
    second = prepare(inputs=[tmp_path / "two.txt"], out_dir=tmp_path / "ds", vocab_size=300, progress=False)
    assert second.meta["n_train"] != first.meta["n_train"]
    assert TokenDataset.open(tmp_path / "ds").meta == second.meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "one.txt", "two.txt"]


@pytest.mark.parametrize("failure", ["empty corpus", "bad jsonl line after tokenizer starts"])
def test_failed_prepare_leaves_existing_dataset_intact(tmp_path: Path, failure: str) -> None:
    (tmp_path / "good.txt").write_text("a perfectly good corpus\n")
    out = tmp_path / "ds"
    prepare(inputs=[tmp_path / "good.txt"], out_dir=out, vocab_size=300, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if failure == "empty corpus":
        (tmp_path / "empty").mkdir()
        bad_inputs = [tmp_path / "empty"]
    else:  # fails midway, after the temporary folder was made
        (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n' * 3 + '{"txt": "typo"}\n')
        bad_inputs = [tmp_path / "bad.jsonl"]
    with pytest.raises(DataError):
        prepare(inputs=bad_inputs, out_dir=out, vocab_size=300, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_empty_corpus_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataError, match=f"empty corpus.*{tmp_path / 'empty'}"):
        prepare(inputs=[tmp_path / "empty"], out_dir=tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds").exists()


def test_vocab_too_small_error() -> None:
    with pytest.raises(DataError, match=r"vocab_size \(100\) must be at least 261"):
        train_tokenizer(["some text"], vocab_size=100)


def test_prepare_refuses_to_replace_a_non_dataset_folder(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("text\n")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("do not delete")
    with pytest.raises(DataError, match=f"not a meshlm dataset: {tmp_path / 'precious'}"):
        prepare(inputs=[tmp_path / "in.txt"], out_dir=tmp_path / "precious", vocab_size=300, progress=False)
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "do not delete"


def test_open_errors_name_the_path(tmp_path: Path, dataset: TokenDataset) -> None:
    with pytest.raises(DataError, match=f"dataset folder not found: {tmp_path / 'missing'}"):
        TokenDataset.open(tmp_path / "missing")
    with pytest.raises(DataError, match=f"no meta.json.*{tmp_path}"):
        TokenDataset.open(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(DataError, match="format is 99, expected 1"):
        TokenDataset.open(tmp_path)


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESHLM_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("MESHLM_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "meshlm"
    assert DEFAULT_VOCAB_SIZE == 8192


def test_ensure_default_dataset_prepares_once_and_survives_a_race(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MESHLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "mine.py").write_text("print('this process')\n")
    (tmp_path / "theirs.py").write_text("print('the process that finished first')\n")
    expected = tmp_path / "cache" / "data" / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-v300"

    def racing_corpus() -> list[Path]:  # another rank completes the dataset while this one is still working
        prepare(inputs=[tmp_path / "theirs.py"], out_dir=expected, vocab_size=300, progress=False)
        return [tmp_path / "mine.py"]

    monkeypatch.setattr(meshlm.data, "default_corpus", racing_corpus)
    assert ensure_default_dataset(vocab_size=300, progress=False) == expected
    assert "preparing the default corpus" in capsys.readouterr().err
    assert TokenDataset.open(expected).meta["inputs"] == [str(tmp_path / "theirs.py")]  # the winner's, intact
    assert [p.name for p in expected.parent.iterdir()] == [expected.name]  # the loser cleaned up

    monkeypatch.setattr(meshlm.data, "default_corpus", lambda: pytest.fail("prepared twice"))
    assert ensure_default_dataset(vocab_size=300, progress=False) == expected
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- lm_batch


def test_lm_batch_shapes_and_shift(stream: np.ndarray) -> None:
    x, y = lm_batch(stream, step=3, seq_len=16, global_batch=8, data_rank=0, data_world=1, seed=1)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # the stream is arange, so every row is consecutive


def test_lm_batch_deterministic_and_steps_differ(stream: np.ndarray) -> None:
    args = dict(seq_len=16, global_batch=8, data_rank=0, data_world=1, seed=7)
    a, b = lm_batch(stream, step=5, **args), lm_batch(stream, step=5, **args)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], lm_batch(stream, step=6, **args)[0])
    assert not torch.equal(a[0], lm_batch(stream, step=5, **{**args, "seed": 8})[0])


@pytest.mark.parametrize("world", [2, 4])
def test_lm_batch_ranks_union_equals_single_process(stream: np.ndarray, world: int) -> None:
    full_x, full_y = lm_batch(stream, step=11, seq_len=32, global_batch=8, data_rank=0, data_world=1, seed=0)
    parts = [lm_batch(stream, step=11, seq_len=32, global_batch=8, data_rank=r, data_world=world, seed=0)
             for r in range(world)]
    assert all(p[0].shape == (8 // world, 32) for p in parts)
    assert torch.equal(torch.cat([p[0] for p in parts]), full_x)
    assert torch.equal(torch.cat([p[1] for p in parts]), full_y)


def test_lm_batch_errors_name_values(stream: np.ndarray) -> None:
    with pytest.raises(DataError, match=r"global_batch \(10\).*data_world \(4\)"):
        lm_batch(stream, step=0, seq_len=8, global_batch=10, data_rank=0, data_world=4, seed=0)
    with pytest.raises(DataError, match=r"\(5 tokens\).*seq_len 8"):
        lm_batch(stream[:5], step=0, seq_len=8, global_batch=2, data_rank=0, data_world=1, seed=0)


def test_lm_batch_reads_memmap_to_the_last_token(dataset: TokenDataset) -> None:
    n = len(dataset.train)
    x, y = lm_batch(dataset.train, step=0, seq_len=n - 1, global_batch=2, data_rank=0, data_world=1, seed=0)
    assert torch.equal(y[0], torch.from_numpy(dataset.train[1:].astype(np.int64)))


# ----------------------------------------------------------------------------- mlm_batch

MLM = dict(cls_id=3, sep_id=4, mask_id=2, vocab_size=VOCAB)


def test_mlm_batch_structure(stream: np.ndarray) -> None:
    ids, labels, types = mlm_batch(stream + 100, step=0, seq_len=32, global_batch=16, data_rank=0, data_world=1,
                                   seed=0, **MLM)
    assert ids.shape == labels.shape == types.shape == (16, 32)
    assert ids.dtype == labels.dtype == types.dtype == torch.int64
    assert (ids[:, 0] == 3).all() and (ids[:, -1] == 4).all() and (types == 0).all()
    assert (labels[:, 0] == -100).all() and (labels[:, -1] == -100).all()
    chosen = labels != -100
    assert chosen.sum(dim=1).min() >= 1  # at least one prediction per row
    # Unchosen window positions are untouched; chosen labels are the original tokens (consecutive in the stream).
    window, window_labels = ids[:, 1:-1], labels[:, 1:-1]
    start = torch.where(window_labels[:, :1] != -100, window_labels[:, :1], window[:, :1])  # (B, 1)
    assert torch.equal(torch.where(window_labels != -100, window_labels, window), start + torch.arange(30))


def test_mlm_batch_masking_rates(stream: np.ndarray) -> None:
    ids, labels, _ = mlm_batch(stream + 100, step=1, seq_len=130, global_batch=256, data_rank=0, data_world=1,
                               seed=0, **MLM)
    chosen = labels != -100
    n_window, n_chosen = 256 * 128, int(chosen.sum())
    assert 0.13 < n_chosen / n_window < 0.17  # 15%; sd is ~0.2 percentage points
    masked = (ids[chosen] == 2).float().mean().item()
    kept = (ids[chosen] == labels[chosen]).float().mean().item()
    random_ok = ids[chosen & (ids != 2) & (ids != labels)]
    assert 0.75 < masked < 0.85 and 0.07 < kept < 0.13
    assert ((random_ok >= 5) & (random_ok < VOCAB)).all()


def test_mlm_batch_deterministic_and_layout_independent(stream: np.ndarray) -> None:
    args = dict(step=4, seq_len=24, global_batch=8, seed=3, **MLM)
    full = mlm_batch(stream, data_rank=0, data_world=1, **args)
    again = mlm_batch(stream, data_rank=0, data_world=1, **args)
    assert all(torch.equal(a, b) for a, b in zip(full, again))
    assert not torch.equal(full[0], mlm_batch(stream, data_rank=0, data_world=1, **{**args, "step": 5})[0])
    for world in (2, 4):
        parts = [mlm_batch(stream, data_rank=r, data_world=world, **args) for r in range(world)]
        for i in range(3):
            assert torch.equal(torch.cat([p[i] for p in parts]), full[i])


def test_mlm_batch_errors(stream: np.ndarray) -> None:
    with pytest.raises(DataError, match=r"global_batch \(6\).*data_world \(4\)"):
        mlm_batch(stream, step=0, seq_len=16, global_batch=6, data_rank=0, data_world=4, seed=0, **MLM)
    with pytest.raises(DataError, match=r"seq_len \(2\)"):
        mlm_batch(stream, step=0, seq_len=2, global_batch=4, data_rank=0, data_world=1, seed=0, **MLM)
