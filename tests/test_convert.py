"""Hugging Face import/export: GPT-2, Llama (GQA, untied head) and BERT (MLM) logits equal transformers',
tensors round-trip exactly, bad input is refused with a message naming the file and the problem.

Everything is local: random tiny models saved with save_pretrained, the hub switched offline and
sockets refused while the tests run.
"""

import json
import os
import socket

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # read by huggingface_hub when it is imported, so before transformers
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from meshlm import convert  # noqa: E402
from meshlm.config import ConfigError, gpt  # noqa: E402
from meshlm.model import Transformer, build_model  # noqa: E402
from meshlm.settings import RunConfig  # noqa: E402
from meshlm.train import checkpoint  # noqa: E402

V, T, D, L, H = 128, 16, 64, 2, 4


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: nothing may be downloaded."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def hf_model(kind: str):
    """A random tiny transformers model; biases and norms are perturbed too, so a swapped name shows."""
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=D, n_layer=L, n_head=H,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=V, max_position_embeddings=T, hidden_size=D, intermediate_size=96,
                                       num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=2,
                                       tie_word_embeddings=False, rope_theta=1000.0, rms_norm_eps=1e-5,
                                       bos_token_id=0, eos_token_id=0)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.BertConfig(vocab_size=V, max_position_embeddings=T, hidden_size=D, intermediate_size=128,
                                      num_hidden_layers=L, num_attention_heads=H)
        model = transformers.BertForMaskedLM(cfg) if kind == "bert" else transformers.BertModel(cfg)
    with torch.no_grad():
        for p in model.parameters():  # parameters() lists a tied weight once
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def hf_logits(model, ids):
    with torch.no_grad():
        if model.config.model_type == "bert":
            zeros, ones = torch.zeros_like(ids), torch.ones_like(ids)
            return model(input_ids=ids, token_type_ids=zeros, attention_mask=ones).logits
        return model(input_ids=ids).logits


def ours_from(folder):
    """Our model built from a checkpoint folder, as a user would: build_model, then the saved tensors."""
    params, _, manifest = checkpoint.load(folder)
    cfg = RunConfig.from_dict(manifest["config"]).model
    model = build_model(cfg)
    checkpoint.check_shapes(folder, params, model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    return model.eval(), manifest


def our_logits(model, ids):
    with torch.no_grad():
        if model.cfg.family == "bert":
            return model(ids, token_types=torch.zeros_like(ids))
        return model(ids)


def saved(model, folder):
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("kind, auto, arch", [
    ("gpt2", "AutoModelForCausalLM", "GPT2LMHeadModel"),
    ("llama", "AutoModelForCausalLM", "LlamaForCausalLM"),
    ("bert", "AutoModelForMaskedLM", "BertForMaskedLM"),
])
def test_import_export_round_trip(tmp_path, kind, auto, arch):
    hf = hf_model(kind)
    src = saved(hf, tmp_path / "hf")
    ids = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))
    want = hf_logits(hf, ids)

    folder = convert.from_hf(src, tmp_path / "run")
    assert folder == tmp_path / "run" / "ckpt" / "step_000000"
    ours, manifest = ours_from(folder)
    assert manifest["config"]["preset"] == f"hf:{arch}"
    torch.testing.assert_close(our_logits(ours, ids), want, atol=1e-5, rtol=0)

    out = convert.to_hf(tmp_path / "run", tmp_path / "export")  # a run folder: its newest checkpoint
    exported = json.loads((out / "config.json").read_text())
    assert exported["architectures"] == [arch]
    back = getattr(transformers, auto).from_pretrained(out).eval()
    assert type(back).__name__ == arch
    torch.testing.assert_close(hf_logits(back, ids), want, atol=1e-5, rtol=0)

    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(after) == sorted(before)  # tied weights written once, as save_pretrained does
    for name, t in before.items():
        assert torch.equal(after[name], t), name


def test_config_fields_map(tmp_path):
    folder = convert.from_hf(saved(hf_model("llama"), tmp_path / "hf"), tmp_path / "run")
    _, manifest = ours_from(folder)
    m = manifest["config"]["model"]
    assert (m["family"], m["n_heads"], m["n_kv_heads"], m["d_ff"], m["rope_theta"], m["norm_eps"],
            m["tie_embeddings"], m["bias"], m["max_seq_len"]) == ("llama", 4, 2, 96, 1000.0, 1e-5, False, False, T)
    assert manifest["extra"]["hf"]["architecture"] == "LlamaForCausalLM"
    exported = json.loads((convert.to_hf(folder, tmp_path / "export") / "config.json").read_text())
    assert exported["rope_parameters"]["rope_theta"] == 1000.0 and exported["num_key_value_heads"] == 2
    assert exported["eos_token_id"] == 0  # token ids carried over from the imported config


def test_sharded_and_base_model_folders(tmp_path):
    hf = hf_model("gpt2")
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    hf.transformer.save_pretrained(tmp_path / "base", safe_serialization=True)  # GPT2Model: no 'transformer.'
    ref, _, _ = checkpoint.load(convert.from_hf(saved(hf, tmp_path / "hf"), tmp_path / "a"))
    for src, out in ((tmp_path / "sharded", "b"), (tmp_path / "base", "c")):
        params, _, _ = checkpoint.load(convert.from_hf(src, tmp_path / out))
        assert sorted(params) == sorted(ref)
        assert all(torch.equal(params[n], ref[n]) for n in ref)


def test_bert_model_without_mlm_head(tmp_path, capsys):
    """BertModel: the pooler is dropped, the MLM head initialised, both said; the encoder matches."""
    hf = hf_model("bert-base")
    assert convert.main(["--from-hf", str(saved(hf, tmp_path / "hf")), "--out", str(tmp_path / "run")]) == 0
    line = capsys.readouterr().out.strip()
    assert "BertModel" in line and "dropped: pooler.dense.bias, pooler.dense.weight;" in line
    assert "initialised: mlm_dense.weight, mlm_dense.bias, mlm_norm.weight, mlm_norm.bias, mlm_bias" in line
    params, _, manifest = checkpoint.load(tmp_path / "run" / "ckpt" / "step_000000")
    cfg = RunConfig.from_dict(manifest["config"]).model
    encoder = Transformer(cfg, post=False).eval()  # embeddings and blocks: BertModel's last_hidden_state
    encoder.load_state_dict({n: params[n] for n, _ in encoder.named_parameters()})
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(input_ids=ids, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        torch.testing.assert_close(encoder(ids), want, atol=1e-5, rtol=0)


def test_tokenizer_travels(tmp_path, capsys):
    from tokenizers import Tokenizer, models
    src = saved(hf_model("gpt2"), tmp_path / "hf")
    Tokenizer(models.WordLevel({"<|endoftext|>": 0, "<|pad|>": 1, "a": 2}, unk_token="a")).save(
        str(src / "tokenizer.json"))
    assert convert.main(["--from-hf", str(src), "--out", str(tmp_path / "run")]) == 0
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    folder = tmp_path / "run" / "ckpt" / "step_000000"
    assert (folder / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert convert.main(["--to-hf", str(folder), "--out", str(tmp_path / "export")]) == 0
    assert "-> " + str(tmp_path / "export") in capsys.readouterr().out
    assert (tmp_path / "export" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


# --- bad input ------------------------------------------------------------------------------------


def error(fn, *args) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_unsupported_architecture(tmp_path):
    src = tmp_path / "t5"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"}))
    message = error(convert.from_hf, src, tmp_path / "out")
    assert str(src / "config.json") in message
    assert "['T5ForConditionalGeneration'] is not supported" in message
    assert "GPT2LMHeadModel, GPT2Model, LlamaForCausalLM, BertForMaskedLM, BertModel" in message
    assert not (tmp_path / "out").exists()


def test_pickle_only_folder_is_refused(tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": D, "n_head": H}))
    (src / "pytorch_model.bin").write_bytes(b"never unpickled")
    message = error(convert.from_hf, src, tmp_path / "out")
    assert f"{src}: only pytorch_model.bin found" in message and "safetensors" in message


def test_missing_extra_and_misshapen_tensors(tmp_path):
    src = saved(hf_model("gpt2"), tmp_path / "hf")
    tensors = load_file(src / "model.safetensors")
    f = src / "model.safetensors"

    save_file({n: t for n, t in tensors.items() if n != "transformer.h.1.mlp.c_fc.weight"}, f)
    message = error(convert.from_hf, src, tmp_path / "o1")
    assert f"{f}: tensor transformer.h.1.mlp.c_fc.weight is missing (meshlm's layers.1.mlp.w1.weight)" == message

    save_file(tensors | {"transformer.h.0.attn.rotary.weight": torch.zeros(2)}, f)
    message = error(convert.from_hf, src, tmp_path / "o2")
    assert f"{f}: unexpected tensor transformer.h.0.attn.rotary.weight" in message

    save_file(tensors | {"transformer.wpe.weight": torch.zeros(T + 1, D)}, f)
    message = error(convert.from_hf, src, tmp_path / "o3")
    assert f"{f}: tensor transformer.wpe.weight has shape (17, 64), config.json implies (16, 64)" == message

    save_file(tensors | {"lm_head.weight": torch.zeros(V, D)}, f)  # GPT-2 ties lm_head to wte
    message = error(convert.from_hf, src, tmp_path / "o4")
    assert "lm_head.weight differs from transformer.wte.weight" in message


def test_unsupported_settings(tmp_path):
    src = saved(hf_model("gpt2"), tmp_path / "hf")
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(hf | {"activation_function": "relu"}))
    message = error(convert.from_hf, src, tmp_path / "out")
    assert f"{src / 'config.json'}: activation_function ('relu') is not supported" in message


def test_existing_out_is_never_overwritten(tmp_path, capsys):
    src = saved(hf_model("gpt2"), tmp_path / "hf")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    message = error(convert.from_hf, src, out)
    assert f"--out {out} already exists and is not empty" in message
    folder = convert.from_hf(src, tmp_path / "run")
    message = error(convert.to_hf, folder, out)
    assert f"--out {out} already exists and is not empty" in message
    assert (out / "keep.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["keep.txt"]
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert convert.to_hf(folder, tmp_path / "empty") == tmp_path / "empty"
    with pytest.raises(SystemExit) as e:  # exactly one of --from-hf / --to-hf
        convert.main(["--from-hf", str(src), "--to-hf", str(folder), "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_export_refuses_what_hf_cannot_hold(tmp_path):
    run = RunConfig(preset="gpt-moe-tiny", model=gpt(vocab_size=V, d_model=D, n_layers=L, n_heads=H, d_ff=128,
                                                        max_seq_len=T, n_experts=4, experts_per_token=1))
    params = {n: p.detach() for n, p in build_model(run.model).named_parameters()}
    folder = checkpoint.save(tmp_path / "moe" / "ckpt", step=1, params=params, config=run.to_dict())
    message = error(convert.to_hf, folder, tmp_path / "out")
    assert "model.n_experts (4)" in message and "Mixtral export is not supported" in message
    message = error(convert.config_to_hf, gpt(vocab_size=V, d_model=D, n_heads=H).replace(activation="swiglu"))
    assert message == ("model.activation ('swiglu') must be 'gelu_tanh' or 'gelu' "
                       "to export a gpt model as GPT2LMHeadModel")
    assert not (tmp_path / "out").exists()


def test_checkpoint_missing_a_tensor(tmp_path):
    folder = convert.from_hf(saved(hf_model("llama"), tmp_path / "hf"), tmp_path / "run")
    params, _, manifest = checkpoint.load(folder)
    del params["layers.1.attn.wk.weight"]
    bad = checkpoint.save(tmp_path / "bad" / "ckpt", step=0, params=params, config=manifest["config"])
    message = error(convert.to_hf, bad, tmp_path / "out")
    assert message == f"checkpoint {bad}: no tensor for parameter layers.1.attn.wk.weight"
