"""Hugging Face export and import: the round trip is the identity on parameters and
logits; exported configs and tensor names are transformers' own; refusals name the
field. With torch installed (not in CI), the exported checkpoints are loaded by
LlamaForCausalLM, OlmoeForCausalLM and the shipped PolyCom modelling file and give
polyjax's logits."""

import dataclasses
import functools
import json
import math
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from polyjax import activations as acts
from polyjax import hf, sample, train
from polyjax.config import Spec, TrainConfig
from polyjax.data import DataConfig
from polyjax.data.tokenizers import ByteTokenizer
from polyjax.model import ModelConfig, Transformer
from polyjax.optim import OptimConfig
from polyjax.restore import Run, load_run

ROOT = pathlib.Path(__file__).resolve().parents[1]

CONFIGS = {
    "llama": dict(d_ff=48, activation=dict(name="swiglu")),
    "olmoe": dict(qk_norm=True, activation=dict(name="swiglu"), moe=dict(renormalize=True)),
    "polynorm_dense_scan": dict(d_ff=64, scan_layers=True, activation=dict(name="polynorm")),
    "polyrelu_moe_per_expert": dict(
        activation=dict(name="polyrelu", order=2), moe=dict(per_expert_coeffs=True)
    ),
    "polyprelu_moe_per_expert": dict(
        qk_norm=True, activation=dict(name="polyprelu"), moe=dict(per_expert_coeffs=True)
    ),
    "polynorm_glu": dict(d_ff=48, n_kv_heads=4, activation=dict(name="polynorm_glu")),
    "polycom_type2_rms": dict(
        d_ff=64, activation=dict(name="polycom", base="rms_norm", polycom_type=2)
    ),
}


def tiny_config(name: str) -> ModelConfig:
    d = dict(
        vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32
    ) | dict(rope_theta=500.0, norm_eps=1e-6)
    extra = dict(CONFIGS[name])
    if "moe" in extra:
        extra["moe"] = dict(num_experts=4, top_k=2, d_expert=16) | extra["moe"]
    return ModelConfig.from_dict(d | extra)


@functools.cache
def tiny_model(name: str) -> Transformer:
    """A random model whose norm gains and activation parameters are not their
    initial values either (so that a wrong reshape or order would show)."""
    model = Transformer(tiny_config(name), rngs=nnx.Rngs(0))
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        names = set(map(str, path))
        if names & {"scale", "coeffs", "slope"}:
            noise = jax.random.normal(jax.random.key(i), var[...].shape)
            var[...] = var[...] + 0.3 * noise
    return model


TOKENS = np.array([[72, 101, 108, 108, 111, 44, 32, 82, 111, 109, 101, 111, 33, 10, 0, 256]])


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)[0]


def logits_of(model) -> np.ndarray:
    return np.asarray(_forward(*nnx.split(model), jnp.asarray(TOKENS)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tensors_and_config_round_trip(name):
    cfg = tiny_config(name)
    params = hf.flat_params(tiny_model(name))
    tensors = hf.to_hf(cfg, params)
    back = hf.from_hf(cfg, tensors)
    assert back.keys() == params.keys()
    for key in params:
        np.testing.assert_array_equal(back[key], params[key], err_msg=key)
    again = ModelConfig.from_dict(hf.model_config_from_hf(hf.hf_config(cfg, eos_id=256)))
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "kv_heads", "max_seq_len"):
        assert getattr(again, field) == getattr(cfg, field), field
    for field in ("d_ff", "qk_norm", "rope_theta", "norm_eps"):
        assert getattr(again, field) == getattr(cfg, field), field
    a, b = again.activation, cfg.activation
    assert (a.name, a.order, a.eps) == (b.name, b.order, b.eps)
    if b.name == "polycom":
        assert (a.base, a.polycom_type) == (b.base, b.polycom_type)
    if cfg.moe is not None:
        for field in ("num_experts", "top_k", "d_expert", "renormalize", "per_expert_coeffs"):
            if field != "per_expert_coeffs" or hf.architecture(cfg) == "polycom":
                assert getattr(again.moe, field) == getattr(cfg.moe, field), field
    # polyjax stores coefficients ascending, the export descending.
    if "layers.0.ffn.act.coeffs.weight" in params:
        w = params["layers.0.ffn.act.coeffs.weight"]
        hf_name = next(
            k for k in tensors if k.startswith("model.layers.0.") and "act_fn.weight" in k
        )
        np.testing.assert_array_equal(tensors[hf_name], w.reshape(-1, w.shape[-1])[0, ::-1])


def llama_names(n_layers: int) -> set[str]:
    """The parameter names of transformers' LlamaForCausalLM (untied head)."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(n_layers):
        layer = f"model.layers.{i}."
        names |= {layer + n + ".weight" for n in ("input_layernorm", "post_attention_layernorm")}
        names |= {f"{layer}self_attn.{p}_proj.weight" for p in "qkvo"}
        names |= {f"{layer}mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    return names


def olmoe_names(n_layers: int, experts: int) -> set[str]:
    """OlmoeForCausalLM's names as stored on the hub (one module per expert)."""
    names = {n for n in llama_names(n_layers) if ".mlp." not in n}
    for i in range(n_layers):
        layer = f"model.layers.{i}."
        names |= {f"{layer}self_attn.{p}_norm.weight" for p in "qk"} | {f"{layer}mlp.gate.weight"}
        for e in range(experts):
            names |= {f"{layer}mlp.experts.{e}.{p}_proj.weight" for p in ("gate", "up", "down")}
    return names


def export(tmp_path, name, dtype="float32") -> pathlib.Path:
    cfg = tiny_config(name)
    out = tmp_path / name
    hf.write_export(out, cfg, hf.flat_params(tiny_model(name)), ByteTokenizer(), dtype)
    return out


def test_swiglu_exports_are_llama_and_olmoe_with_their_names(tmp_path):
    from safetensors import safe_open

    for name, arch, expected in (
        ("llama", "llama", llama_names(2)),
        ("olmoe", "olmoe", olmoe_names(2, 4)),
        ("polynorm_dense_scan", "polycom", None),
    ):
        out = export(tmp_path, name)
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == arch
        with safe_open(str(out / "model.safetensors"), framework="flax") as f:
            names = set(f.keys())
        if expected is not None:
            assert names == expected
            assert not (out / hf.REMOTE_FILE).exists()
        else:
            assert (out / hf.REMOTE_FILE).is_file() and "auto_map" in config


def test_exported_configs_load_in_transformers_config_classes(tmp_path):
    transformers = pytest.importorskip("transformers")

    llama = transformers.LlamaConfig.from_pretrained(export(tmp_path, "llama"))
    cfg = tiny_config("llama")
    assert (llama.hidden_size, llama.intermediate_size) == (cfg.d_model, cfg.d_ff)
    assert (llama.num_attention_heads, llama.num_key_value_heads) == (cfg.n_heads, cfg.kv_heads)
    assert (llama.num_hidden_layers, llama.vocab_size) == (cfg.n_layers, cfg.vocab_size)
    assert llama.head_dim == cfg.d_model // cfg.n_heads and llama.rms_norm_eps == cfg.norm_eps
    assert not llama.tie_word_embeddings and not llama.attention_bias and not llama.mlp_bias
    rope = getattr(llama, "rope_parameters", None) or {"rope_theta": llama.rope_theta}
    assert rope["rope_theta"] == cfg.rope_theta and rope.get("rope_type", "default") == "default"
    olmoe = transformers.OlmoeConfig.from_pretrained(export(tmp_path, "olmoe"))
    cfg = tiny_config("olmoe")
    assert (olmoe.num_experts, olmoe.num_experts_per_tok) == (4, 2)
    assert olmoe.intermediate_size == cfg.moe.d_expert and olmoe.norm_topk_prob is True
    assert olmoe.clip_qkv is None
    # The byte tokenizer, as a transformers tokenizer: byte b is id b, eos 256.
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "llama")
    text = "O Romeo, Romeo! — wherefore art thou Romeo?"
    assert tok(text)["input_ids"] == list(text.encode())
    assert tok.eos_token_id == 256 and tok.decode(list(text.encode())) == text


def hf_llama_config(**changes) -> dict:
    return hf.hf_config(tiny_config("llama"), eos_id=256) | changes


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope_parameters"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(head_dim=16), "head_dim"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(model_type="mistral"), "model_type"),
        (dict(model_type="olmoe", num_experts=4, num_experts_per_tok=2, clip_qkv=8.0), "clip_qkv"),
    ],
)
def test_unrepresentable_configs_are_refused_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=f"config.json: {field}") as e:
        hf.model_config_from_hf(hf_llama_config(**changes))
    assert "\n" not in str(e.value)


def test_unexpected_and_missing_tensors_are_refused():
    cfg = tiny_config("llama")
    tensors = hf.to_hf(cfg, hf.flat_params(tiny_model("llama")))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.bias has no place"):
        hf.from_hf(cfg, tensors | {"model.layers.0.self_attn.q_proj.bias": np.zeros(32)})
    missing = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"no tensor lm_head\.weight"):
        hf.from_hf(cfg, missing)
    bad = tensors | {"model.norm.weight": np.zeros(31)}
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(31,\)"):
        hf.from_hf(cfg, bad)


def test_cli_round_trip_export_import_train_and_sample(tmp_path, capsys, tiny, launch_py):
    """A run -> export -> import -> the same parameters and logits, and the run's
    training config (not the defaults); the imported workdir samples, resumes
    training with its config.py, and exports again."""
    cfg = tiny.config(**{"train.steps": 1, "train.checkpoint_every": 1, "optim.lr": 2e-3})
    cfg.unlock().model.activation.name = "swiglu"
    cfg.model.d_ff = 128  # 2/3 of the tiny 192, as the equal-parameter rule gives
    run = Spec.from_config(cfg).config
    train.train(Spec.from_config(cfg), tmp_path / "run")
    assert (
        hf.main(["export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    )
    assert "as llama" in capsys.readouterr().out
    assert hf.main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert "imported llama" in capsys.readouterr().out
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["optim"] == run["optim"] and back["train"] == run["train"]
    assert back["data"] == run["data"] | {"tokenizer": str(tmp_path / "back" / "tokenizer.json")}
    original, imported = load_run(tmp_path / "run"), load_run(tmp_path / "back")
    a, b = hf.flat_params(original.model), hf.flat_params(imported.model)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    np.testing.assert_array_equal(logits_of(original.model), logits_of(imported.model))
    prompt = [imported.tokenizer.encode("ROMEO:")]
    assert sample.generate(imported, prompt, 8) == sample.generate(original, prompt, 8)
    # launch.py --sample prints the prompt and its continuation.
    argv = ["--sample", "--workdir", str(tmp_path / "back"), "--prompt", "ROMEO:"]
    printed = launch_py(*argv, "--max_new_tokens", "8", "--temperature", "0").out
    assert printed.startswith("ROMEO:") and len(printed) > len("ROMEO:")
    # Importing over an existing run is refused; the run is untouched.
    assert hf.main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    # The imported workdir trains on: one more step from its step-0 checkpoint.
    resumed = runpy.run_path(str(tmp_path / "back" / "config.py"))["get_config"]()
    resumed.train.steps = 1
    out = train.train(Spec.from_config(resumed), tmp_path / "back")
    assert np.isfinite(out["loss"]) and load_run(tmp_path / "back").step == 1


def test_import_config_is_the_exported_runs_training_config_else_the_defaults(tmp_path, tiny):
    """An export of a polyjax run carries its data, optim and train sections (lr,
    batch, steps, warmup unlike the defaults); a checkpoint from elsewhere (a Llama)
    imports with the defaults; ``--seq_len`` overrides either."""
    changes = {"optim.lr": 2e-3, "data.global_batch": 16, "train.steps": 600}
    run = tiny.spec(**changes, **{"optim.warmup_steps": 50}).config
    cfg = tiny_config("llama")
    tok = str(tmp_path / "tokenizer.json")
    exported = hf.import_config(hf_llama_config(polyjax={"config": run}), cfg, tok, "n")
    exported = json.loads(json.dumps(exported))  # as the workdir's config.json holds it
    for section in ("optim", "train"):
        assert exported[section] == run[section], section
    assert exported["data"] == run["data"] | {"tokenizer": tok}
    plain = hf.import_config(hf_llama_config(), cfg, tok, "n")
    assert plain["optim"] == dataclasses.asdict(OptimConfig())
    assert plain["train"] == dataclasses.asdict(TrainConfig())
    assert plain["data"] == dataclasses.asdict(
        DataConfig(tokenizer=tok, seq_len=cfg.max_seq_len, global_batch=math.lcm(8, 8))
    )  # the default 256 cut to the model's 32 positions
    assert plain["optim"]["lr"] != exported["optim"]["lr"]
    short = hf.import_config(hf_llama_config(polyjax={"config": run}), cfg, tok, "n", 8)
    assert short["data"]["seq_len"] == 8


@pytest.fixture
def polysin(monkeypatch):
    """A user's new activation, "polysin" (sin(x)), and a new polycom base "sin",
    registered as a user would: computed in polyjax, unknown to the modelling file."""
    monkeypatch.setitem(acts.REGISTRY, "polysin", acts.ActivationSpec("polysin"))
    monkeypatch.setitem(acts.BASES, "polysin", jnp.sin)
    monkeypatch.setitem(acts.BASES, "sin", jnp.sin)


@pytest.mark.parametrize(
    "activation,refused,listed",
    [
        ({"name": "polysin"}, "activation 'polysin'", "polynorm"),
        ({"name": "polycom", "base": "sin"}, "activation.base 'sin'", "gelu_tanh"),
    ],
)
def test_export_refuses_what_the_modelling_file_cannot_compute(
    tmp_path, capsys, monkeypatch, polysin, activation, refused, listed
):
    """One line naming the activation (or base) and what the file computes, exit 2,
    nothing written."""
    cfg = ModelConfig.from_dict(
        dict(vocab_size=264, d_model=32, n_layers=1, n_heads=4, max_seq_len=32, d_ff=64)
        | {"activation": activation}
    )
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=refused) as e:
        hf.write_export(tmp_path / "out", cfg, hf.flat_params(model), ByteTokenizer())
    assert listed in str(e.value) and "\n" not in str(e.value)
    run = Run(cfg, model, ByteTokenizer(), None, 1, {})
    monkeypatch.setattr(hf, "load_run", lambda workdir: run)
    assert hf.main(["export", "--workdir", "w", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("polyjax.hf: error: ") and refused in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_the_modelling_file_computes_every_registered_activation_and_base():
    """So that the refusal above only meets activations added after it."""
    activations, bases = hf.shipped_activations()
    assert set(acts.REGISTRY) <= set(activations)
    assert set(acts.BASES) <= set(bases)


# ----------------------------------------------------------------------------
# In PyTorch (torch is not in CI: these run where it is installed).


def torch_logits(model) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


@pytest.mark.parametrize("name", ["llama", "olmoe"])
def test_transformers_models_give_polyjax_logits(tmp_path, name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = export(tmp_path, name)
    cls = transformers.LlamaForCausalLM if name == "llama" else transformers.OlmoeForCausalLM
    model = cls.from_pretrained(out, torch_dtype=torch.float32).eval()
    np.testing.assert_allclose(torch_logits(model), logits_of(tiny_model(name)), atol=1e-4)
    # Exactly the names and shapes transformers writes itself.
    model.save_pretrained(tmp_path / "resaved")
    from safetensors import safe_open

    mine, theirs = {}, {}
    for folder, into in ((out, mine), (tmp_path / "resaved", theirs)):
        with safe_open(str(folder / "model.safetensors"), framework="flax") as f:
            into.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
    assert mine == theirs


@pytest.mark.parametrize("name", [n for n in CONFIGS if n not in ("llama", "olmoe")])
def test_polycom_modelling_file_gives_polyjax_logits(tmp_path, name):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = export(tmp_path, name)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model).__name__ == "PolycomForCausalLM"
    np.testing.assert_allclose(torch_logits(model), logits_of(tiny_model(name)), atol=1e-4)


def test_polycom_generate_with_its_cache_equals_polyjax_greedy(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    name = "polyrelu_moe_per_expert"
    out = export(tmp_path, name)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    prompt = [72, 101, 108, 108, 111]
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None
        )[0, len(prompt) :].tolist()
    graphdef, state = nnx.split(tiny_model(name))
    row = list(prompt)
    for _ in range(8):  # full forward passes, right-padded (causal) to one shape
        padded = jnp.asarray([row + [0] * (32 - len(row))])
        row.append(int(np.argmax(_forward(graphdef, state, padded)[0, len(row) - 1])))
    assert generated == row[len(prompt) :]


def test_import_of_a_checkpoint_written_by_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(**hf_llama_config())
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(hf.byte_tokenizer_json())
    cfg = ModelConfig.from_dict(
        hf.model_config_from_hf(json.loads((tmp_path / "hf/config.json").read_text()))
    )
    params = hf.from_hf(cfg, hf.read_tensors(tmp_path / "hf"))
    jax_model = Transformer(cfg, rngs=nnx.Rngs(0))
    nnx.update(jax_model, hf.model_from_params(cfg, params))
    np.testing.assert_allclose(logits_of(jax_model), torch_logits(model), atol=1e-4)
