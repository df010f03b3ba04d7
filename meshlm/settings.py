"""Run settings: typed dataclasses, TOML files and `--section.field value` overrides.

A run is configured by four sections, each a dataclass with a docstring under every field:
`model` (ModelConfig, plus `preset`), `layout` (Layout), `train` (TrainConfig) and `data` (DataConfig).
Values are applied in order: dataclass defaults, the model preset, a TOML file (`--config run.toml`),
then command-line overrides. Every value is checked against its field's type; an unknown field or a
wrong type is a `ConfigError` whose one line names the field, the value and what was expected.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import sys
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import ConfigError, ModelConfig, check_model, preset
from .layout import Layout

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 150
    """Optimizer steps to train."""
    batch_size: int = 16
    """Global batch size in sequences (split over the data-parallel ranks and micro-batches)."""
    seq_len: int = 0
    """Tokens per sequence. 0 means the model's max_seq_len."""
    lr: float = 2e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio at the last step."""
    warmup_steps: int = 15
    """Linear warm-up steps from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not to biases, norms or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    bucket_mb: float = 25.0
    """Data parallelism: size of a gradient bucket in MB; each complete bucket is all-reduced during backward."""
    reduce_fp32: bool = False
    """Data parallelism: all-reduce gradients in fp32 even when they are bf16."""
    compression: str = "none"
    """Data parallelism: gradient compression none, bf16, fp16, powersgd or powersgd:RANK (approximate)."""
    grad_sync: Literal["allreduce", "ps"] = "allreduce"
    """Data parallelism: all-reduce among peers, or a parameter server (the classic baseline)."""
    ps_ranks: str = "0"
    """Parameter server: comma-separated ranks that hold the parameters (each holds an equal share)."""
    grad_clip: float = 1.0
    """Clip gradients to this global L2 norm; 0 disables clipping."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """fp32; bf16 autocast with fp32 weights and optimizer states; fp16 the same plus dynamic loss scaling
    (16-bit matmuls are slower than fp32 on CPUs without 16-bit units)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation (Korthikanti et al. 2022): none; selective (the attention core); full (every block)."""
    compile: Literal["auto", "true", "false"] = "auto"
    """torch.compile each transformer block, after tensor parallelism and recomputation: auto is on for CUDA with
    dense blocks, tp and cp 1 and no zero-bubble schedule (where it pays), off on CPU (compiling costs more)."""
    seed: int = 0
    """Seed of the initial weights, of the batch sampler and of dropout."""
    eval_every: int = 50
    """Evaluate the validation loss every this many steps (and at the end); 0 disables."""
    eval_batches: int = 4
    """Batches per validation-loss evaluation."""
    ckpt_every: int = 0
    """Save a checkpoint every this many steps; 0 saves only at the end."""
    ckpt_async: bool = True
    """Write periodic checkpoints in a background thread while training goes on (the copy off the model is
    made first); the final checkpoint is written before the run ends."""
    keep_ckpts: int = 2
    """Keep the newest this many checkpoints; older ones are deleted after a new one is complete."""
    out_dir: str = ""
    """Output folder (metrics, checkpoints, tokenizer). Empty: runs/<date-time>."""
    resume: bool = False
    """Continue from the newest checkpoint in out_dir."""
    elastic: bool = False
    """Elastic node count (torchrun --nnodes MIN:MAX; `meshlm train --nodes MIN:MAX` sets it): when the job's world
    size differs from the layout's, dp becomes world / (pp*ep*cp*tp), the other degrees and the global batch stay;
    the run resumes from out_dir's newest checkpoint, resharded, whenever there is one (after a lost node, or when a
    node joins), so give each elastic job its own out_dir."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto picks cuda when available, else cpu."""
    threads: int = 0
    """CPU threads per process; 0 divides the machine's cores among the local processes."""
    progress: bool = True
    """Show a progress bar (rank 0)."""
    log_every: int = 0
    """Write metrics every this many steps (and before evaluations, checkpoints and the end); between them the
    losses and norms stay on the device, so the host never waits for a GPU step. 0: 1 on CPU, 10 on CUDA."""
    tensorboard: bool = True
    """Also write TensorBoard events when the tensorboard package is installed."""
    collective_timeout_s: float = 600.0
    """Seconds a collective may wait for the other ranks before it fails; each rank then dumps its flight
    recorder to out_dir/flight/ and the run names the rank that never arrived (`meshlm doctor` reads them)."""
    flight_recorder: bool = True
    """Keep the last collectives of each rank in a ring (dumped on a timeout or on SIGUSR1)."""
    straggler_every: int = 10
    """Every this many steps, compare the ranks' compute time per step and report the slow ones; 0 disables."""
    straggler_factor: float = 1.5
    """A rank whose compute time per step exceeds the median by this factor is reported as a straggler."""
    profile_steps: str = ""
    """Profile these steps ('A-B', or 'A'; counted from 1) with torch.profiler: one Chrome trace JSON per rank in
    out_dir/profile/, with meshlm's collectives ("all_reduce dp") and pipeline actions named. Empty: off."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str = ""
    """Prepared dataset folder (from `meshlm data prepare`). Empty: the Python standard library corpus."""
    vocab_size: int = 8192
    """Vocabulary of the tokenizer trained for the default corpus."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    preset: str = "gpt-small"
    """Model preset the [model] fields start from."""
    model: ModelConfig = field(default_factory=lambda: preset("gpt-small"))
    layout: Layout = field(default_factory=Layout)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        return cls(preset=d.get("preset", "gpt-small"), model=ModelConfig(**d["model"]),
                   layout=Layout(**d["layout"]), train=TrainConfig(**d["train"]), data=DataConfig(**d["data"]))


SECTIONS: dict[str, type] = {"model": ModelConfig, "layout": Layout, "train": TrainConfig, "data": DataConfig}


# --- parsing values -----------------------------------------------------------------------------


def _convert(key: str, raw: Any, typ: Any) -> Any:
    """Convert a TOML value or a command-line string to the field's type, or raise ConfigError."""
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        if raw not in choices:
            raise ConfigError(f"{key} ({raw!r}) must be one of: {', '.join(map(str, choices))}")
        return raw
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key} ({raw!r}) must be a boolean (true or false)")
    if typ is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ConfigError(f"{key} ({raw!r}) must be an integer")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} ({raw!r}) must be an integer") from None
    if typ is float:
        if isinstance(raw, bool):
            raise ConfigError(f"{key} ({raw!r}) must be a number")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} ({raw!r}) must be a number") from None
    if typ is str:
        return str(raw)
    raise ConfigError(f"{key}: unsupported field type {typ}")  # pragma: no cover


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown setting {key!r}{hint}; see `meshlm train --help`")


def _all_keys() -> list[str]:
    keys = ["model.preset"]
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{name}" for name in _field_types(cls)]
    return keys


def build_config(*, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults <- model preset <- TOML file <- overrides ({'layout.tp': '2', ...}); every value checked."""
    values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise _unknown(section, _all_keys())
            for name, value in table.items():
                values[f"{section}.{name}"] = value
    values.update(overrides or {})

    known = _all_keys()
    for key in values:
        if key not in known:
            raise _unknown(key, known)

    preset_name = str(values.pop("model.preset", RunConfig.preset))
    sections: dict[str, Any] = {"model": preset(preset_name), "layout": Layout(),
                                "train": TrainConfig(), "data": DataConfig()}
    for section, cls in SECTIONS.items():
        types = _field_types(cls)
        changes = {name: _convert(f"{section}.{name}", values[f"{section}.{name}"], typ)
                   for name, typ in types.items() if f"{section}.{name}" in values}
        if changes:
            sections[section] = dataclasses.replace(sections[section], **changes)
    if sections["train"].seq_len == 0:
        sections["train"] = dataclasses.replace(sections["train"], seq_len=sections["model"].max_seq_len)
    cfg = RunConfig(preset=preset_name, **sections)
    check_model(cfg.model)
    check_train(cfg)
    return cfg


def check_train(cfg: RunConfig) -> None:
    t = cfg.train
    for name in ("steps", "batch_size", "seq_len", "eval_batches", "keep_ckpts"):  # seq_len 0 resolved above
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} ({getattr(t, name)}) must be >= 1")
    for name in ("warmup_steps", "eval_every", "ckpt_every", "threads", "straggler_every", "log_every"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} ({getattr(t, name)}) must be >= 0")
    for name in ("bucket_mb", "collective_timeout_s"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"train.{name} ({getattr(t, name)}) must be > 0")
    if t.straggler_factor <= 1:
        raise ConfigError(f"train.straggler_factor ({t.straggler_factor}) must be > 1")
    from .train.profile import parse_steps
    try:
        steps = parse_steps(t.profile_steps)
    except ValueError as e:
        raise ConfigError(f"train.profile_steps ({t.profile_steps!r}) {e}") from None
    if steps is not None and steps[1] > t.steps:
        raise ConfigError(f"train.profile_steps ({t.profile_steps!r}) must end by train.steps ({t.steps})")
    try:
        from .parallel.compress import make_compressor
        make_compressor(t.compression)
    except ValueError as e:
        raise ConfigError(f"train.{e}") from None
    if t.grad_sync == "ps" and cfg.layout.zero:
        raise ConfigError(f"train.grad_sync ('ps') cannot be combined with layout.zero ({cfg.layout.zero})")
    if t.compression != "none" and (cfg.layout.zero or t.grad_sync == "ps"):
        raise ConfigError(f"train.compression ({t.compression!r}) works with plain data parallelism only "
                          "(layout.zero 0, train.grad_sync 'allreduce')")
    if t.grad_sync == "ps":
        from .parallel.ps import parse_ps_ranks
        try:
            parse_ps_ranks(t.ps_ranks, cfg.layout.dp * cfg.layout.ep * cfg.layout.cp)
        except ValueError as e:
            raise ConfigError(f"train.{e}") from None
    if t.lr <= 0:
        raise ConfigError(f"train.lr ({t.lr}) must be > 0")
    if t.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"train.seq_len ({t.seq_len}) must not exceed model.max_seq_len ({cfg.model.max_seq_len})")
    if cfg.model.family == "bert" and t.seq_len < 3:
        raise ConfigError(f"train.seq_len ({t.seq_len}) must be >= 3 for bert ([cls] + tokens + [sep])")


def take_flags(argv: list[str], names) -> tuple[dict[str, str], list[str]]:
    """Take the value flags `names` (`--flag VALUE` or `--flag=VALUE`) out of argv: ({flag: value}, the rest
    in order). A flag given twice keeps its last value; ConfigError when one has no value."""
    found: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name not in names:
            rest.append(argv[i])
        else:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{name} needs a value")
                value = argv[i + 1]
                i += 1
            found[name] = value
        i += 1
    return found, rest


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--layout.tp', '2', '--train.steps=50'] -> {'layout.tp': '2', 'train.steps': '50'}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; settings look like --section.field VALUE")
        key, eq, value = arg[2:].partition("=")
        if key == "model":  # shorthand: --model llama-tiny
            key = "model.preset"
        if "." not in key:
            raise _unknown(key, _all_keys())
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            value = args[i + 1]
            i += 1
        out[key] = value
        i += 1
    return out


# --- help ---------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (read from its source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def settings_help() -> str:
    """Every setting with its type, default and docstring, for `meshlm train --help`."""
    lines = ["settings (in a TOML file as [section] name = value, or on the command line as --section.name VALUE):",
             "", "  --model.preset NAME   (or --model NAME) model preset, default gpt-small; see `meshlm presets`"]
    defaults = RunConfig()
    for section, cls in SECTIONS.items():
        lines += ["", f"[{section}]"]
        docs = field_docs(cls)
        current = getattr(defaults, section)
        for name, typ in _field_types(cls).items():
            if typing.get_origin(typ) is Literal:
                tname = "{" + "|".join(map(str, typing.get_args(typ))) + "}"
            else:
                tname = typ.__name__.upper()
            lines.append(f"  --{section}.{name} {tname}  (default {getattr(current, name)!r})")
            if name in docs:
                lines.append(f"      {docs[name]}")
    return "\n".join(lines)
