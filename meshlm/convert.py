"""Hugging Face checkpoints in and out: GPT-2, Llama and BERT, read and written as safetensors only.

    meshlm convert --from-hf DIR --out OUT    a transformers folder -> OUT/ckpt/step_000000 (a meshlm checkpoint)
    meshlm convert --to-hf CKPT --out DIR     a meshlm checkpoint -> DIR/config.json + model.safetensors

Nothing is downloaded and nothing is unpickled: a folder with only `pytorch_model.bin` is refused
(re-save it with `save_pretrained(..., safe_serialization=True)`). transformers itself is not needed.

One table of `Rule`s per family maps a Hugging Face tensor to ours, in both directions:

    GPT-2 (GPT2LMHeadModel; GPT2Model without 'transformer.')   meshlm
      transformer.wte / wpe                                      tok_emb / pos_emb
      transformer.h.{i}.ln_1 / ln_2                              layers.{i}.norm1 / norm2
      transformer.h.{i}.attn.c_attn   (in, 3C) Conv1D            layers.{i}.attn.wq | wk | wv   (transposed, split)
      transformer.h.{i}.attn.c_proj   (in, out) Conv1D           layers.{i}.attn.wo             (transposed)
      transformer.h.{i}.mlp.c_fc / c_proj  Conv1D                layers.{i}.mlp.w1 / w2         (transposed)
      transformer.ln_f                                           norm_f
      lm_head (tied to wte unless tie_word_embeddings is false)  head
    Llama (LlamaForCausalLM)
      model.embed_tokens                                         tok_emb
      model.layers.{i}.input_layernorm / post_attention_layernorm  layers.{i}.norm1 / norm2
      model.layers.{i}.self_attn.q_proj | k_proj | v_proj | o_proj  layers.{i}.attn.wq | wk | wv | wo
      model.layers.{i}.mlp.up_proj | gate_proj | down_proj       layers.{i}.mlp.w1 | w3 | w2
      model.norm                                                 norm_f
      lm_head (absent when tie_word_embeddings)                  head
    BERT (BertForMaskedLM; BertModel without 'bert.')
      bert.embeddings.word_ | position_ | token_type_embeddings  tok_emb | pos_emb | type_emb
      bert.embeddings.LayerNorm                                  emb_norm
      bert.encoder.layer.{i}.attention.self.query | key | value  layers.{i}.attn.wq | wk | wv
      bert.encoder.layer.{i}.attention.output.dense              layers.{i}.attn.wo
      bert.encoder.layer.{i}.attention.output.LayerNorm          layers.{i}.norm1  (post-norm: after attention)
      bert.encoder.layer.{i}.intermediate.dense / output.dense   layers.{i}.mlp.w1 / w2
      bert.encoder.layer.{i}.output.LayerNorm                    layers.{i}.norm2  (after the feed-forward)
      cls.predictions.transform.dense / LayerNorm                mlm_dense / mlm_norm
      cls.predictions.bias (decoder tied to word_embeddings)     mlm_bias

Both Llama and our model apply RoPE in the 'rotate half' layout, so q_proj and k_proj are copied as
they are. Tensors that are not weights (GPT-2's attn.bias mask, position_ids, rotary inv_freq) are
skipped; tied copies (lm_head, cls.predictions.decoder) are checked equal to what they are tied to;
BERT's pooler and next-sentence head, which our model has no place for, are dropped and named in
the summary; a BertModel folder has no MLM head, which is initialised as a new model's is.
Any other tensor, missing or extra, is an error naming it and its file.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig, bert, check_model, gpt, llama
from .model import Transformer, full_init
from .settings import RunConfig, TrainConfig
from .train import checkpoint

ARCHITECTURES: dict[str, str] = {
    "GPT2LMHeadModel": "gpt", "GPT2Model": "gpt",
    "LlamaForCausalLM": "llama",
    "BertForMaskedLM": "bert", "BertModel": "bert",
}
"""The Hugging Face architectures `from_hf` reads, and the family each becomes."""

EXPORT: dict[str, tuple[str, str]] = {
    "gpt": ("GPT2LMHeadModel", "gpt2"), "llama": ("LlamaForCausalLM", "llama"), "bert": ("BertForMaskedLM", "bert"),
}
"""The architecture and model_type `to_hf` writes for each family."""

_PREFIX = {"gpt": "transformer.", "llama": "model.", "bert": "bert."}  # the base model inside the *For* models
_HEAD_ROOTS = ("lm_head.", "cls.")  # tensors of the *For* models that live outside the base model
_BUFFERS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.position_ids|\.rotary_emb\.inv_freq)$")
_DROPPED = ("bert.pooler.", "cls.seq_relationship.")  # real weights our model has no place for
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


# --- the name tables ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Hugging Face tensor `hf` is our tensors `ours` concatenated along dim 0 (GPT-2 fuses q, k, v),
    transposed when `transpose` (GPT-2's Conv1D stores (in, out); nn.Linear stores (out, in))."""

    hf: str
    ours: tuple[str, ...]
    transpose: bool = False


def _linear(hf: str, ours: str, *, bias: bool, transpose: bool = False) -> list[Rule]:
    rules = [Rule(f"{hf}.weight", (f"{ours}.weight",), transpose)]
    return rules + ([Rule(f"{hf}.bias", (f"{ours}.bias",))] if bias else [])


def _norm(hf: str, ours: str, *, bias: bool) -> list[Rule]:
    return _linear(hf, ours, bias=bias)  # a weight and (LayerNorm) a bias, never transposed


def rules(cfg: ModelConfig) -> list[Rule]:
    """Every tensor of the Hugging Face model of cfg's family (named as in its *For* architecture)."""
    L = range(cfg.n_layers)
    r: list[Rule] = []
    if cfg.family == "gpt":
        p = "transformer."
        r += [Rule(f"{p}wte.weight", ("tok_emb",)), Rule(f"{p}wpe.weight", ("pos_emb",))]
        for i in L:
            h, b = f"{p}h.{i}.", f"layers.{i}."
            r += _norm(f"{h}ln_1", f"{b}norm1", bias=True)
            r += [Rule(f"{h}attn.c_attn.weight", tuple(f"{b}attn.{w}.weight" for w in ("wq", "wk", "wv")), True),
                  Rule(f"{h}attn.c_attn.bias", tuple(f"{b}attn.{w}.bias" for w in ("wq", "wk", "wv")))]
            r += _linear(f"{h}attn.c_proj", f"{b}attn.wo", bias=True, transpose=True)
            r += _norm(f"{h}ln_2", f"{b}norm2", bias=True)
            r += _linear(f"{h}mlp.c_fc", f"{b}mlp.w1", bias=True, transpose=True)
            r += _linear(f"{h}mlp.c_proj", f"{b}mlp.w2", bias=True, transpose=True)
        r += _norm(f"{p}ln_f", "norm_f", bias=True)
    elif cfg.family == "llama":
        p, bias = "model.", cfg.bias
        r += [Rule(f"{p}embed_tokens.weight", ("tok_emb",))]
        for i in L:
            h, b = f"{p}layers.{i}.", f"layers.{i}."
            r += _norm(f"{h}input_layernorm", f"{b}norm1", bias=False)
            for hf, ours in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
                r += _linear(f"{h}self_attn.{hf}", f"{b}attn.{ours}", bias=bias)
            r += _norm(f"{h}post_attention_layernorm", f"{b}norm2", bias=False)
            for hf, ours in (("up_proj", "w1"), ("gate_proj", "w3"), ("down_proj", "w2")):
                r += _linear(f"{h}mlp.{hf}", f"{b}mlp.{ours}", bias=bias)
        r += _norm(f"{p}norm", "norm_f", bias=False)
    elif cfg.family == "bert":
        p = "bert."
        e = f"{p}embeddings."
        r += [Rule(f"{e}word_embeddings.weight", ("tok_emb",)), Rule(f"{e}position_embeddings.weight", ("pos_emb",)),
              Rule(f"{e}token_type_embeddings.weight", ("type_emb",))]
        r += _norm(f"{e}LayerNorm", "emb_norm", bias=True)
        for i in L:
            h, b = f"{p}encoder.layer.{i}.", f"layers.{i}."
            for hf, ours in (("query", "wq"), ("key", "wk"), ("value", "wv")):
                r += _linear(f"{h}attention.self.{hf}", f"{b}attn.{ours}", bias=True)
            r += _linear(f"{h}attention.output.dense", f"{b}attn.wo", bias=True)
            r += _norm(f"{h}attention.output.LayerNorm", f"{b}norm1", bias=True)
            r += _linear(f"{h}intermediate.dense", f"{b}mlp.w1", bias=True)
            r += _linear(f"{h}output.dense", f"{b}mlp.w2", bias=True)
            r += _norm(f"{h}output.LayerNorm", f"{b}norm2", bias=True)
        r += _linear("cls.predictions.transform.dense", "mlm_dense", bias=True)
        r += _norm("cls.predictions.transform.LayerNorm", "mlm_norm", bias=True)
        r += [Rule("cls.predictions.bias", ("mlm_bias",))]
    else:
        raise ConfigError(f"model.family ({cfg.family!r}) has no Hugging Face mapping")
    if not cfg.tie_embeddings:
        r += [Rule("lm_head.weight", ("head",))]
    return r


def tied(cfg: ModelConfig) -> dict[str, str]:
    """Hugging Face tensors that are copies of others when the head is tied: {copy: original}."""
    if cfg.family == "bert":
        return {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                "cls.predictions.decoder.bias": "cls.predictions.bias"}
    if not cfg.tie_embeddings:
        return {}
    return {"lm_head.weight": "transformer.wte.weight" if cfg.family == "gpt" else "model.embed_tokens.weight"}


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and whole shapes, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {n: tuple(getattr(p, "meshlm_init_shape", p.shape)) for n, p in model.named_parameters()}


def check_params(params: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """The names of `params` are exactly the model's, and every shape matches."""
    missing = [n for n in shapes if n not in params]
    extra = [n for n in params if n not in shapes]
    if missing:
        raise ConfigError(f"{where}: no tensor for parameter {missing[0]}" + _more(missing))
    if extra:
        raise ConfigError(f"{where}: tensor {extra[0]} is not a parameter of the model" + _more(extra))
    for n, want in shapes.items():
        if tuple(params[n].shape) != want:
            raise ConfigError(f"{where}: {n} has shape {tuple(params[n].shape)}, the model wants {want}")


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


# --- reading a Hugging Face folder --------------------------------------------------------------


class _Tensors:
    """The tensors of a Hugging Face folder, from model.safetensors or its shards, read on demand."""

    def __init__(self, hf_dir: Path):
        single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
        self.files: dict[str, Path] = {}  # tensor name -> file
        if single.is_file():
            self.where = str(single)
            self._add(single)
        elif index.is_file():
            self.where = str(index)
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{index}: not a safetensors index with a weight_map ({e})") from None
            for shard in sorted(set(weight_map.values())):
                if not (hf_dir / shard).is_file():
                    raise ConfigError(f"{index}: shard {shard} is missing from {hf_dir}")
                self._add(hf_dir / shard, only=[n for n, f in weight_map.items() if f == shard])
        elif (hf_dir / "pytorch_model.bin").is_file() or list(hf_dir.glob("pytorch_model-*.bin")):
            raise ConfigError(f"{hf_dir}: only pytorch_model.bin found; meshlm reads safetensors only (it never "
                              "unpickles): re-save with save_pretrained(..., safe_serialization=True)")
        else:
            raise ConfigError(f"{hf_dir}: no model.safetensors (or model.safetensors.index.json)")

    def _add(self, path: Path, only: list[str] | None = None) -> None:
        try:
            with safe_open(path, framework="pt") as f:
                names = set(f.keys())
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{path}: not a readable safetensors file ({e})") from None
        for n in names if only is None else only:
            if n not in names:
                raise ConfigError(f"{path}: tensor {n}, listed in model.safetensors.index.json, is not in it")
            self.files[n] = path

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self.files[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path} not found (a Hugging Face model folder has config.json and model.safetensors)")
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return value


def _one_of(hf: dict, key: str, allowed: tuple, path: Path, *, default: Any = None) -> Any:
    value = hf.get(key, default)
    if value not in allowed:
        raise ConfigError(f"{path}: {key} ({value!r}) is not supported; meshlm supports "
                          + ", ".join(repr(a) for a in allowed))
    return value


def _rope_theta(hf: dict, path: Path) -> float:
    """rope_theta, from transformers 5's rope_parameters or 4's rope_theta; scaled RoPE is refused."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for source in (params, scaling):
        kind = source.get("rope_type", source.get("type", "default"))
        if kind != "default":
            raise ConfigError(f"{path}: rope type {kind!r} is not supported; meshlm supports plain RoPE ('default')")
    return float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)


def config_from_hf(arch: str, hf: dict, path: Path) -> ModelConfig:
    """Our ModelConfig for a Hugging Face config.json (already known to be of a supported architecture)."""
    family = ARCHITECTURES[arch]
    if family == "gpt":
        act = _one_of(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh", "gelu"), path, default="gelu_new")
        _one_of(hf, "scale_attn_weights", (True,), path, default=True)
        _one_of(hf, "scale_attn_by_inverse_layer_idx", (False,), path, default=False)
        _one_of(hf, "add_cross_attention", (False,), path, default=False)
        d = hf.get("n_embd", 768)
        cfg = gpt(vocab_size=hf.get("vocab_size", 50257), max_seq_len=hf.get("n_positions", 1024), d_model=d,
                  n_layers=hf.get("n_layer", 12), n_heads=hf.get("n_head", 12), d_ff=hf.get("n_inner") or 4 * d,
                  norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), dropout=float(hf.get("resid_pdrop", 0.0)),
                  init_std=float(hf.get("initializer_range", 0.02)))
        cfg = cfg.replace(activation="gelu" if act == "gelu" else "gelu_tanh",
                          tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    elif family == "llama":
        _one_of(hf, "hidden_act", ("silu",), path, default="silu")
        bias = _one_of(hf, "attention_bias", (False, True), path, default=False)
        if hf.get("mlp_bias", False) != bias:  # one switch in our model: both or neither
            raise ConfigError(f"{path}: mlp_bias ({hf.get('mlp_bias')!r}) must equal attention_bias ({bias!r}); "
                              "meshlm has one bias switch for every linear layer")
        d, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
        if hf.get("head_dim") not in (None, d // heads):
            raise ConfigError(f"{path}: head_dim ({hf['head_dim']}) must be hidden_size / num_attention_heads "
                              f"({d // heads}) for meshlm")
        cfg = llama(vocab_size=hf.get("vocab_size", 32000), max_seq_len=hf.get("max_position_embeddings", 2048),
                    d_model=d, n_layers=hf.get("num_hidden_layers", 32), n_heads=heads,
                    n_kv_heads=hf.get("num_key_value_heads") or heads, d_ff=hf.get("intermediate_size", 11008),
                    norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(hf, path),
                    dropout=float(hf.get("attention_dropout", 0.0)), init_std=float(hf.get("initializer_range", 0.02)))
        cfg = cfg.replace(bias=bool(bias), tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    else:
        # the MLM transform uses the same activation as the blocks, and ours is exact GELU
        _one_of(hf, "hidden_act", ("gelu",), path, default="gelu")
        _one_of(hf, "position_embedding_type", ("absolute",), path, default="absolute")
        _one_of(hf, "is_decoder", (False,), path, default=False)
        _one_of(hf, "add_cross_attention", (False,), path, default=False)
        _one_of(hf, "tie_word_embeddings", (True,), path, default=True)
        cfg = bert(vocab_size=hf.get("vocab_size", 30522), max_seq_len=hf.get("max_position_embeddings", 512),
                   d_model=hf.get("hidden_size", 768), n_layers=hf.get("num_hidden_layers", 12),
                   n_heads=hf.get("num_attention_heads", 12), d_ff=hf.get("intermediate_size", 3072),
                   norm_eps=float(hf.get("layer_norm_eps", 1e-12)), dropout=float(hf.get("hidden_dropout_prob", 0.0)),
                   init_std=float(hf.get("initializer_range", 0.02)))
        cfg = cfg.replace(type_vocab_size=hf.get("type_vocab_size", 2))
    if cfg.type_vocab_size < 0 or (family == "bert" and cfg.type_vocab_size < 1):
        raise ConfigError(f"{path}: type_vocab_size ({cfg.type_vocab_size}) must be >= 1")
    try:
        check_model(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if cfg.vocab_size < 1:
        raise ConfigError(f"{path}: vocab_size ({cfg.vocab_size}) must be >= 1")
    return cfg


def _architecture(hf: dict, path: Path) -> str:
    archs = hf.get("architectures")
    known = [a for a in archs or [] if a in ARCHITECTURES] if isinstance(archs, list) else []
    if not known:
        raise ConfigError(f"{path}: architectures {archs!r} is not supported; meshlm converts "
                          + ", ".join(ARCHITECTURES))
    return known[0]


def _canonical(name: str, family: str) -> str:
    """A file's tensor name as the *For* architecture names it (GPT2Model, BertModel lack the prefix;
    very old BERT files call LayerNorm's weight and bias gamma and beta)."""
    prefix = _PREFIX[family]
    if not name.startswith(prefix) and not name.startswith(_HEAD_ROOTS):
        name = prefix + name
    if family == "bert" and ".LayerNorm." in name:
        name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
    return name


@dataclass
class Imported:
    """What `import_hf` read: our config, our tensors, and what it dropped or had to initialise."""

    arch: str
    cfg: ModelConfig
    params: dict[str, torch.Tensor]
    dropped: list[str]
    initialised: list[str]
    hf_config: dict[str, Any]


def import_hf(hf_dir: str | Path) -> Imported:
    """Read a Hugging Face folder into our config and whole fp32 tensors by our names (writes nothing)."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConfigError(f"Hugging Face model folder not found: {hf_dir}")
    cfg_path = hf_dir / "config.json"
    hf = _read_json(cfg_path)
    arch = _architecture(hf, cfg_path)
    cfg = config_from_hf(arch, hf, cfg_path)
    files = _Tensors(hf_dir)
    where = files.where
    names = {_canonical(n, cfg.family): n for n in files.files}  # canonical name -> name in the file
    base = arch in ("GPT2Model", "BertModel")  # their files name the base model's tensors without its prefix
    as_in_file = lambda n: n.removeprefix(_PREFIX[cfg.family]) if base else n  # noqa: E731
    shapes = model_shapes(cfg)

    params: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    initialised: list[str] = []
    table = rules(cfg)
    head_absent = arch == "BertModel" and not any(n.startswith("cls.predictions.") for n in names)
    for rule in table:
        if rule.hf not in names:
            if head_absent and rule.hf.startswith("cls.predictions."):
                initialised += rule.ours  # a BertModel has no MLM head: it starts as a new model's
                continue
            raise ConfigError(f"{where}: tensor {as_in_file(rule.hf)} is missing (meshlm's {', '.join(rule.ours)})")
        used.add(rule.hf)
        parts = [shapes[n] for n in rule.ours]
        want = (sum(s[0] for s in parts), *parts[0][1:])
        want = tuple(reversed(want)) if rule.transpose else want
        have = files.shape(names[rule.hf])
        if have != want:
            raise ConfigError(f"{files.files[names[rule.hf]]}: tensor {names[rule.hf]} has shape {have}, "
                              f"{cfg_path.name} implies {want}")
        t = files.get(names[rule.hf]).float()
        t = t.t() if rule.transpose else t
        for n, piece in zip(rule.ours, torch.split(t, [s[0] for s in parts], dim=0)):
            params[n] = piece.contiguous()
    if initialised:
        with torch.device("meta"):
            model = Transformer(cfg)
        meta = dict(model.named_parameters())
        for n in initialised:
            params[n] = full_init(n, meta[n], 0)

    dropped = []
    for name in sorted(set(names) - used):
        original = tied(cfg).get(name)
        if original is not None:
            copy, of = files.get(names[name]), files.get(names[original]) if original in names else None
            if of is not None and not torch.equal(copy.float(), of.float()):
                raise ConfigError(f"{files.files[names[name]]}: {names[name]} differs from {names[original]}, "
                                  f"but a {cfg.family} model ({cfg_path.name}) ties them")
        elif name.startswith(_DROPPED):
            dropped.append(names[name])
        elif not _BUFFERS.search(name):
            raise ConfigError(f"{files.files[names[name]]}: unexpected tensor {names[name]}: "
                              f"not part of a {arch} that meshlm can hold")
    check_params(params, shapes, where)
    return Imported(arch=arch, cfg=cfg, params=params, dropped=dropped, initialised=initialised, hf_config=hf)


# --- writing ------------------------------------------------------------------------------------


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not empty; convert never overwrites: choose a new folder")


def from_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Import a Hugging Face GPT-2, Llama or BERT folder as checkpoint step 0 under out/ckpt; returns its folder."""
    return _from_hf(Path(hf_dir), Path(out))[0]


def _from_hf(hf_dir: Path, out: Path) -> tuple[Path, Imported]:
    _check_out(out)
    imp = import_hf(hf_dir)
    run = RunConfig(preset=f"hf:{imp.arch}", model=imp.cfg, train=TrainConfig(seq_len=imp.cfg.max_seq_len))
    extra = {"hf": {"architecture": imp.arch, "source": str(hf_dir), "config": imp.hf_config,
                    "dropped": imp.dropped, "initialised": imp.initialised}}
    tok = hf_dir / "tokenizer.json"
    folder = checkpoint.save(out / "ckpt", step=0, params=imp.params, config=run.to_dict(), extra=extra,
                             tokenizer=tok if tok.is_file() else None, keep=1)
    return folder, imp


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for cfg's family (GPT2LMHeadModel, LlamaForCausalLM or BertForMaskedLM); refuses what the
    Hugging Face architecture cannot express."""
    if cfg.n_experts > 0:
        raise ConfigError(f"model.n_experts ({cfg.n_experts}): a mixture-of-experts model cannot be exported "
                          "(Mixtral export is not supported); only dense GPT-2, Llama and BERT models")
    if cfg.family not in EXPORT:
        raise ConfigError(f"model.family ({cfg.family!r}) has no Hugging Face architecture")
    arch, model_type = EXPORT[cfg.family]
    mha = (0, cfg.n_heads)  # GPT-2 and BERT have no grouped-query attention
    need: dict[str, Any] = {
        "gpt": {"norm": "layernorm", "norm_position": "pre", "position": "learned", "causal": True, "bias": True,
                "type_vocab_size": 0, "n_kv_heads": mha, "activation": ("gelu_tanh", "gelu")},
        "llama": {"norm": "rmsnorm", "norm_position": "pre", "position": "rope", "causal": True,
                  "activation": "swiglu", "type_vocab_size": 0},
        "bert": {"norm": "layernorm", "norm_position": "post", "position": "learned", "causal": False, "bias": True,
                 "tie_embeddings": True, "activation": "gelu", "n_kv_heads": mha},
    }[cfg.family]
    for name, allowed in need.items():
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"model.{name} ({getattr(cfg, name)!r}) must be "
                              f"{' or '.join(repr(a) for a in allowed)} to export a {cfg.family} model as {arch}")
    common = {"architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
              "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32"}
    if cfg.family == "gpt":
        return common | {
            "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_inner": cfg.d_ff, "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    if cfg.family == "llama":
        return common | {
            "max_position_embeddings": cfg.max_seq_len, "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff,
            "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
            "attention_dropout": cfg.dropout, "rope_theta": cfg.rope_theta,  # rope_theta: transformers 4
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}  # transformers 5
    return common | {
        "max_position_embeddings": cfg.max_seq_len, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff, "hidden_act": "gelu",
        "layer_norm_eps": cfg.norm_eps, "type_vocab_size": cfg.type_vocab_size, "position_embedding_type": "absolute",
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout, "is_decoder": False}


def params_to_hf(cfg: ModelConfig, params: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Our whole tensors as the Hugging Face model's (contiguous fp32; a tied head written once, as the embedding)."""
    check_params(params, model_shapes(cfg), where)
    out = {}
    for rule in rules(cfg):
        t = torch.cat([params[n].float() for n in rule.ours], dim=0) if len(rule.ours) > 1 else params[rule.ours[0]]
        out[rule.hf] = (t.t() if rule.transpose else t).float().contiguous()
    return out


def _token_ids(manifest: dict, family: str, tokenizer: Path) -> dict[str, Any]:
    """bos/eos/pad ids: those of the Hugging Face model this checkpoint came from, else our special tokens'."""
    hf = manifest.get("extra", {}).get("hf", {})
    source = hf.get("config", {})
    if source and ARCHITECTURES.get(hf.get("architecture")) == family:
        return {k: source[k] for k in _TOKEN_IDS if k in source}
    ids: dict[str, Any] = dict.fromkeys(_TOKEN_IDS)
    if tokenizer.is_file():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tokenizer))
        eot, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")
        ids.update(bos_token_id=eot, eos_token_id=eot, pad_token_id=pad)
    return ids


def to_hf(ckpt: str | Path, out: str | Path) -> Path:
    """Export a meshlm checkpoint (a step folder, a ckpt/ folder or a run folder: its newest) as a Hugging Face
    folder: config.json, model.safetensors and, when the checkpoint has one, tokenizer.json. Returns out."""
    return _to_hf(Path(ckpt), Path(out))[0]


def _to_hf(ckpt: Path, out: Path) -> tuple[Path, ModelConfig]:
    _check_out(out)
    folder = checkpoint.resolve(ckpt)
    params, _, manifest = checkpoint.load(folder)
    try:
        cfg = RunConfig.from_dict(manifest["config"]).model
    except (KeyError, TypeError) as e:
        raise checkpoint.CheckpointError(f"checkpoint {folder}: manifest.json has no valid run config ({e})") from None
    hf_config = config_to_hf(cfg)
    tensors = params_to_hf(cfg, params, f"checkpoint {folder}")
    tokenizer = folder / "tokenizer.json"
    hf_config |= _token_ids(manifest, cfg.family, tokenizer)

    # written beside `out` and renamed into place when complete: never a half-written model under its name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    if tokenizer.is_file():
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)
    return out, cfg


# --- command line -------------------------------------------------------------------------------


def _size(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="meshlm convert",
                                description="Import or export Hugging Face GPT-2, Llama and BERT models "
                                            "(safetensors only; nothing is downloaded).")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="DIR", help="a Hugging Face model folder (config.json, model.safetensors)")
    way.add_argument("--to-hf", metavar="CKPT", help="a meshlm checkpoint, ckpt/ folder or run folder (its newest)")
    p.add_argument("--out", required=True, help="a new (or empty) folder to write")
    args = p.parse_args(argv)
    if args.from_hf:
        folder, imp = _from_hf(Path(args.from_hf), Path(args.out))
        n = sum(t.numel() for t in imp.params.values())
        notes = "".join(f"; {what}: {', '.join(names)}" for what, names in
                        (("dropped", imp.dropped), ("initialised", imp.initialised)) if names)
        print(f"meshlm: {args.from_hf} ({imp.arch}, {_size(n)} params, {imp.cfg.n_layers} layers, "
              f"d_model {imp.cfg.d_model}, vocab {imp.cfg.vocab_size}) -> {folder}{notes}")
    else:
        out, cfg = _to_hf(Path(args.to_hf), Path(args.out))
        print(f"meshlm: {args.to_hf} ({cfg.family}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
              f"vocab {cfg.vocab_size}) -> {out} ({EXPORT[cfg.family][0]})")
    return 0
