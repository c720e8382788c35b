"""Hugging Face checkpoints: export a polyjax run, import a Llama or OLMoE checkpoint.

    python -m polyjax.hf export --workdir runs/default --out exports/default
    python -m polyjax.hf import path/to/hf_checkpoint --out runs/imported

Export (``pip install -e ".[hf]"``) writes ``model.safetensors``, ``config.json``,
``generation_config.json`` and the tokenizer (``tokenizer.json`` and
``tokenizer_config.json``) of the newest checkpoint:

- SwiGLU, dense, no QK-norm -> ``LlamaForCausalLM``;
- SwiGLU, MoE, with QK-norm -> ``OlmoeForCausalLM`` (experts as the hub stores
  them: ``mlp.experts.<e>.{gate,up,down}_proj``);
- anything else (PolyNorm, PolyReLU, ... dense or MoE) -> ``PolycomForCausalLM``,
  defined by ``modeling_polycom.py``, which the export ships (``auto_map``; load
  with ``trust_remote_code=True``). PolyCom coefficients are written DESCENDING
  (highest power first), as the paper's official code stores them; polyjax keeps
  them ascending. An activation (or polycom base) that file does not compute is
  refused (``check_exportable``) before anything is written.

config.json holds the run's own config too, under ``polyjax.config``.

Layouts map by transposes and reshapes alone: polyjax's attention weights are
``d_model x heads x head_dim`` and its RoPE pairs the two halves of a head
(rotate-half), as transformers does, so no permutation of the heads is needed.

Import reads ``config.json`` and the safetensors (one file or an index) of a
``llama``, ``olmoe`` or ``polycom`` checkpoint and writes a polyjax workdir: a
step-0 checkpoint (parameters in float32, a fresh optimizer state), the tokenizer,
``config.json`` and ``config.py`` (its ``get_config``), so that
``python launch.py --config RUN/config.py --workdir RUN`` trains it further (on
the config's data, Shakespeare by default) and ``launch.py --sample`` samples it.
The data, optim and train sections are the exported run's for a polyjax export
(``import_config``), else the defaults.
Whatever polyjax cannot represent exactly is refused with one line naming the
field: RoPE scaling, tied embeddings, attention or MLP biases, OLMoE's
``clip_qkv``, a head size other than hidden_size / num_attention_heads, an
activation other than SiLU, a tensor the model has no place for.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.resources
import json
import math
import pathlib
import shutil
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from polyjax import checkpoint as ckpt
from polyjax import sharding as shd
from polyjax import train
from polyjax.config import Spec, TrainConfig
from polyjax.data import DataConfig, make_pipeline, tokenizers
from polyjax.model import ModelConfig, Transformer
from polyjax.optim import OptimConfig
from polyjax.restore import load_run

Params = dict[str, np.ndarray]  # flat polyjax parameters: "layers.0.attn.w_q" -> array
REMOTE_FILE = "modeling_polycom.py"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ----------------------------------------------------------------------------
# Which Hugging Face architecture a polyjax model becomes.


def architecture(cfg: ModelConfig) -> str:
    """ "llama", "olmoe" or "polycom" (the shipped modelling file)."""
    if cfg.activation.name == "swiglu":
        if cfg.moe is None and not cfg.qk_norm:
            return "llama"
        if cfg.moe is not None and cfg.qk_norm:
            return "olmoe"
    return "polycom"


def hf_config(cfg: ModelConfig, eos_id: int) -> dict[str, Any]:
    """The config.json of the export."""
    arch = architecture(cfg)
    common = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **common,
            "intermediate_size": cfg.d_ff,
            "hidden_act": "silu",
            "mlp_bias": False,
            "pretraining_tp": 1,
        }
    m = cfg.moe
    if arch == "olmoe":
        return {
            "architectures": ["OlmoeForCausalLM"],
            "model_type": "olmoe",
            **common,
            "intermediate_size": m.d_expert,
            "hidden_act": "silu",
            "num_experts": m.num_experts,
            "num_experts_per_tok": m.top_k,
            "norm_topk_prob": m.renormalize,
            "router_aux_loss_coef": m.lb_coef,
            "output_router_logits": False,
            "clip_qkv": None,
        }
    a = cfg.activation
    return {
        "architectures": ["PolycomForCausalLM"],
        "model_type": "polycom",
        "auto_map": {
            "AutoConfig": "modeling_polycom.PolycomConfig",
            "AutoModelForCausalLM": "modeling_polycom.PolycomForCausalLM",
        },
        **common,
        "intermediate_size": cfg.d_ff if m is None else m.d_expert,
        "qk_norm": cfg.qk_norm,
        "hidden_act": a.name,
        "poly_order": a.order,
        "poly_eps": a.eps,
        "poly_base": a.base,
        "poly_type": a.polycom_type,
        "num_experts": 0 if m is None else m.num_experts,
        "num_experts_per_tok": 1 if m is None else m.top_k,
        "norm_topk_prob": False if m is None else m.renormalize,
        "per_expert_coeffs": False if m is None else m.per_expert_coeffs,
    }


def shipped_activations() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(activations, bases of ``polycom``) that the shipped ``modeling_polycom.py``
    computes: its ``ACTIVATIONS`` and ``BASES`` (and ``rms_norm``, which it computes
    apart), read from its source (the file imports torch)."""
    source = (importlib.resources.files("polyjax.hf_remote") / REMOTE_FILE).read_text()
    names: dict[str, tuple[str, ...]] = {}
    for node in ast.parse(source).body:  # module-level NAME = {...} or (...) of strings
        if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)):
            continue
        value, items = node.value, []
        if isinstance(value, ast.Dict):
            items = [k.value for k in value.keys if isinstance(k, ast.Constant)]
        elif isinstance(value, ast.Tuple):
            for e in value.elts:
                if isinstance(e, ast.Starred) and isinstance(e.value, ast.Name):
                    items += names.get(e.value.id, ())
                elif isinstance(e, ast.Constant) and isinstance(e.value, str):
                    items.append(e.value)
        names[node.targets[0].id] = tuple(dict.fromkeys(items))
    return names["ACTIVATIONS"], (*names["BASES"], "rms_norm")


def check_exportable(cfg: ModelConfig) -> None:
    """ValueError (one line) for a model that the shipped modelling file cannot
    compute: an activation (or ``polycom`` base) it does not know."""
    if architecture(cfg) != "polycom":
        return
    activations, bases = shipped_activations()
    a, where = cfg.activation, f"polyjax/hf_remote/{REMOTE_FILE}"
    if a.name not in activations:
        raise ValueError(
            f"activation {a.name!r}: the shipped {REMOTE_FILE} cannot compute it (it "
            f"computes {', '.join(activations)}); add it to {where} to export this model"
        )
    if a.name == "polycom" and a.base not in bases:
        raise ValueError(
            f"activation.base {a.base!r}: the shipped {REMOTE_FILE} cannot compute it (its "
            f"bases: {', '.join(bases)}); add it to {where} to export this model"
        )


# ----------------------------------------------------------------------------
# Tensors: polyjax <-> Hugging Face names and layouts.


def flat_params(model: Transformer) -> Params:
    """The model's parameters on the host, one entry per layer ("layers.<i>.<name>")
    whether or not the layers are stacked (``scan_layers``)."""
    out: Params = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(map(str, path))
        value = np.asarray(jax.device_get(var.get_value()))
        if model.cfg.scan_layers and path[0] == "layers":
            rest = ".".join(map(str, path[1:]))
            for i in range(model.cfg.n_layers):
                out[f"layers.{i}.{rest}"] = value[i]
        else:
            out[name] = value
    return out


def _coeff_names(cfg: ModelConfig) -> tuple[bool, bool]:
    spec = cfg.activation.spec
    return spec.coeffs, spec.slope


def to_hf(cfg: ModelConfig, p: Params) -> dict[str, np.ndarray]:
    """Hugging Face tensors (torch Linear weights are out x in) from polyjax's."""
    D, H, G = cfg.d_model, cfg.n_heads, cfg.kv_heads
    K = D // H
    gated = cfg.activation.spec.gated
    coeffs, slope = _coeff_names(cfg)
    out = {
        "model.embed_tokens.weight": p["embed"],
        "model.norm.weight": p["final_norm.scale"],
        "lm_head.weight": p["head"].T,
    }
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = p[src + "attn_norm.scale"]
        out[dst + "post_attention_layernorm.weight"] = p[src + "ffn_norm.scale"]
        for name in "qkv":
            out[dst + f"self_attn.{name}_proj.weight"] = p[src + f"attn.w_{name}"].reshape(D, -1).T
        out[dst + "self_attn.o_proj.weight"] = p[src + "attn.w_o"].reshape(H * K, D).T
        if cfg.qk_norm:
            out[dst + "self_attn.q_norm.weight"] = p[src + "attn.q_norm.scale"].reshape(H * K)
            out[dst + "self_attn.k_norm.weight"] = p[src + "attn.k_norm.scale"].reshape(G * K)
        mlp = dst + "mlp."
        if cfg.moe is None:
            out[mlp + ("gate_proj" if gated else "up_proj") + ".weight"] = p[src + "ffn.w_in"].T
            if gated:
                out[mlp + "up_proj.weight"] = p[src + "ffn.w_up"].T
            out[mlp + "down_proj.weight"] = p[src + "ffn.w_out"].T
        else:
            out[mlp + "gate.weight"] = p[src + "ffn.router"].T
            for e in range(cfg.moe.num_experts):
                ex = f"{mlp}experts.{e}."
                out[ex + ("gate_proj" if gated else "up_proj") + ".weight"] = p[src + "ffn.w_in"][
                    e
                ].T
                if gated:
                    out[ex + "up_proj.weight"] = p[src + "ffn.w_up"][e].T
                out[ex + "down_proj.weight"] = p[src + "ffn.w_out"][e].T
        per_expert = cfg.moe is not None and cfg.moe.per_expert_coeffs and coeffs
        if coeffs:
            w, b = p[src + "ffn.act.coeffs.weight"], p[src + "ffn.act.coeffs.bias"]
            if per_expert:
                for e in range(cfg.moe.num_experts):
                    out[f"{mlp}experts.{e}.act_fn.weight"] = w[e, ::-1]  # descending
                    out[f"{mlp}experts.{e}.act_fn.bias"] = b[e]
            else:
                out[mlp + "act_fn.weight"] = w[::-1]  # descending
                out[mlp + "act_fn.bias"] = b
        if slope:
            if per_expert:
                for e in range(cfg.moe.num_experts):
                    out[f"{mlp}experts.{e}.act_fn.slope"] = p[src + "ffn.act.slope"]
            else:
                out[mlp + "act_fn.slope"] = p[src + "ffn.act.slope"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


class _Tensors:
    """Hugging Face tensors by name, each taken at most once (``leftover`` names the
    rest: tensors the model has no place for)."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.tensors, self.taken = dict(tensors), set()

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.tensors:
            raise ValueError(f"the checkpoint has no tensor {name} (expected shape {shape})")
        value = self.tensors[name]
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"tensor {name} has shape {tuple(value.shape)}, expected {shape}")
        self.taken.add(name)
        return value

    def has(self, name: str) -> bool:
        return name in self.tensors

    def leftover(self) -> list[str]:
        ignorable = ("rotary_emb.inv_freq",)
        return sorted(k for k in self.tensors if k not in self.taken and not k.endswith(ignorable))


def from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray]) -> Params:
    """polyjax parameters (flat, per layer) from Hugging Face tensors; ValueError
    naming a missing, misshapen or unexpected tensor."""
    D, H, G, V = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.vocab_size
    K = D // H
    gated = cfg.activation.spec.gated
    coeffs, slope = _coeff_names(cfg)
    r = cfg.activation.order
    t = _Tensors(tensors)
    p: Params = {
        "embed": t("model.embed_tokens.weight", (V, D)),
        "final_norm.scale": t("model.norm.weight", (D,)),
        "head": t("lm_head.weight", (V, D)).T,
    }
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        p[dst + "attn_norm.scale"] = t(src + "input_layernorm.weight", (D,))
        p[dst + "ffn_norm.scale"] = t(src + "post_attention_layernorm.weight", (D,))
        for name, heads in (("q", H), ("k", G), ("v", G)):
            w = t(src + f"self_attn.{name}_proj.weight", (heads * K, D))
            p[dst + f"attn.w_{name}"] = w.T.reshape(D, heads, K)
        p[dst + "attn.w_o"] = t(src + "self_attn.o_proj.weight", (D, H * K)).T.reshape(H, K, D)
        if cfg.qk_norm:
            p[dst + "attn.q_norm.scale"] = t(src + "self_attn.q_norm.weight", (H * K,)).reshape(
                H, K
            )
            p[dst + "attn.k_norm.scale"] = t(src + "self_attn.k_norm.weight", (G * K,)).reshape(
                G, K
            )
        mlp = src + "mlp."
        first = "gate_proj" if gated else "up_proj"
        if cfg.moe is None:
            F = cfg.d_ff
            p[dst + "ffn.w_in"] = t(f"{mlp}{first}.weight", (F, D)).T
            if gated:
                p[dst + "ffn.w_up"] = t(mlp + "up_proj.weight", (F, D)).T
            p[dst + "ffn.w_out"] = t(mlp + "down_proj.weight", (D, F)).T
        else:
            E, F = cfg.moe.num_experts, cfg.moe.d_expert
            p[dst + "ffn.router"] = t(mlp + "gate.weight", (E, D)).T
            if gated and t.has(mlp + "experts.gate_up_proj"):  # transformers 5's fused layout
                gate_up = t(mlp + "experts.gate_up_proj", (E, 2 * F, D))
                p[dst + "ffn.w_in"] = gate_up[:, :F].transpose(0, 2, 1)
                p[dst + "ffn.w_up"] = gate_up[:, F:].transpose(0, 2, 1)
                p[dst + "ffn.w_out"] = t(mlp + "experts.down_proj", (E, D, F)).transpose(0, 2, 1)
            else:
                ex = [f"{mlp}experts.{e}." for e in range(E)]
                stack = lambda name, shape, ex=ex: np.stack([t(x + name, shape).T for x in ex])
                p[dst + "ffn.w_in"] = stack(f"{first}.weight", (F, D))
                if gated:
                    p[dst + "ffn.w_up"] = stack("up_proj.weight", (F, D))
                p[dst + "ffn.w_out"] = stack("down_proj.weight", (D, F))
        per_expert = cfg.moe is not None and cfg.moe.per_expert_coeffs and coeffs
        if coeffs:
            if per_expert:
                ex = [f"{mlp}experts.{e}.act_fn." for e in range(cfg.moe.num_experts)]
                p[dst + "ffn.act.coeffs.weight"] = np.stack(
                    [t(x + "weight", (r,))[::-1] for x in ex]
                )
                p[dst + "ffn.act.coeffs.bias"] = np.stack([t(x + "bias", (1,)) for x in ex])
            else:
                p[dst + "ffn.act.coeffs.weight"] = t(mlp + "act_fn.weight", (r,))[::-1]
                p[dst + "ffn.act.coeffs.bias"] = t(mlp + "act_fn.bias", (1,))
        if slope:
            if per_expert:
                ex = [f"{mlp}experts.{e}.act_fn.slope" for e in range(cfg.moe.num_experts)]
                slopes = [t(x, (1,)) for x in ex]
                if any(not np.array_equal(s, slopes[0]) for s in slopes):
                    raise ValueError(f"{ex[0]}: polyjax shares the PReLU slope across experts")
                p[dst + "ffn.act.slope"] = slopes[0]
            else:
                p[dst + "ffn.act.slope"] = t(mlp + "act_fn.slope", (1,))
    extra = t.leftover()
    if extra:
        raise ValueError(
            f"tensor {extra[0]} has no place in a polyjax model"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    return {k: np.ascontiguousarray(v) for k, v in p.items()}


def model_from_params(cfg: ModelConfig, params: Params, shard=None) -> nnx.State:
    """The parameter state of a ``Transformer(cfg)`` filled from flat ``params``
    (float32 host arrays; stacked when ``scan_layers``), cast to its dtypes."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), shard=shard))
    state = nnx.state(abstract, nnx.Param)

    def value(path, var):
        name = ".".join(map(str, path))
        if cfg.scan_layers and path[0] == "layers":
            rest = ".".join(map(str, path[1:]))
            array = np.stack([params[f"layers.{i}.{rest}"] for i in range(cfg.n_layers)])
        else:
            array = params[name]
        shape = var.get_value().shape
        if array.shape != shape:
            raise ValueError(f"parameter {name}: shape {array.shape}, the model needs {shape}")
        return var.replace(np.asarray(array, var.get_value().dtype))

    flat = [(path, value(path, var)) for path, var in nnx.to_flat_state(state)]
    return nnx.from_flat_state(flat)


# ----------------------------------------------------------------------------
# Reading a Hugging Face config: what polyjax can represent.


def _refuse(field: str, value: Any, why: str) -> None:
    raise ValueError(f"config.json: {field}={value!r}: {why}; polyjax cannot load it exactly")


def _rope_theta(hf: Mapping[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in (None, "default"):
            _refuse("rope_scaling", scaling, "RoPE scaling is not implemented")
    if params:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            _refuse("rope_parameters.rope_type", kind, "RoPE scaling is not implemented")
        extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
        if extra:
            _refuse(f"rope_parameters.{extra[0]}", params[extra[0]], "not implemented")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def model_config_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """A polyjax model config dict from a Hugging Face config.json, or a ValueError
    naming the field that polyjax cannot represent."""
    kind = hf.get("model_type")
    if kind not in ("llama", "olmoe", "polycom"):
        _refuse("model_type", kind, "only llama, olmoe and polycom (a polyjax export) import")
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * H != D:
        _refuse("head_dim", head_dim, f"polyjax's head size is hidden_size / heads = {D // H}")
    if hf.get("tie_word_embeddings", False):
        _refuse("tie_word_embeddings", True, "polyjax's head is untied from the embedding")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field, False):
            _refuse(field, True, "polyjax's linear layers have no biases")
    if hf.get("clip_qkv") is not None:
        _refuse("clip_qkv", hf["clip_qkv"], "polyjax does not clip the attention projections")
    if hf.get("sliding_window") is not None:
        _refuse("sliding_window", hf["sliding_window"], "polyjax's attention is global")
    cfg: dict[str, Any] = {
        "vocab_size": hf["vocab_size"],
        "d_model": D,
        "n_layers": hf["num_hidden_layers"],
        "n_heads": H,
        "n_kv_heads": hf.get("num_key_value_heads") or H,
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "rope_theta": _rope_theta(hf),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "init_std": hf.get("initializer_range", 0.02),
    }
    if kind in ("llama", "olmoe"):
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            _refuse("hidden_act", act, "only SiLU (SwiGLU) imports for llama and olmoe")
        cfg["activation"] = {"name": "swiglu"}
    if kind == "llama":
        cfg.update(d_ff=hf["intermediate_size"], qk_norm=False)
    elif kind == "olmoe":
        cfg.update(
            qk_norm=True,
            moe={
                "num_experts": hf["num_experts"],
                "top_k": hf["num_experts_per_tok"],
                "d_expert": hf["intermediate_size"],
                "renormalize": bool(hf.get("norm_topk_prob", False)),
                "lb_coef": hf.get("router_aux_loss_coef", 0.01),
            },
        )
    else:
        cfg.update(
            qk_norm=bool(hf.get("qk_norm", False)),
            activation={
                "name": hf["hidden_act"],
                "order": hf.get("poly_order", 3),
                "eps": hf.get("poly_eps", 1e-6),
                "base": hf.get("poly_base", "relu"),
                "polycom_type": hf.get("poly_type", 1),
            },
        )
        if hf.get("num_experts", 0):
            cfg["moe"] = {
                "num_experts": hf["num_experts"],
                "top_k": hf["num_experts_per_tok"],
                "d_expert": hf["intermediate_size"],
                "renormalize": bool(hf.get("norm_topk_prob", False)),
                "per_expert_coeffs": bool(hf.get("per_expert_coeffs", False)),
            }
        else:
            cfg["d_ff"] = hf["intermediate_size"]
    try:
        ModelConfig.from_dict(cfg)
    except ValueError as e:
        raise ValueError(f"config.json: {e}") from None
    return cfg


def read_tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of ``model.safetensors`` or of the files of
    ``model.safetensors.index.json``, as float32 host arrays."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{folder} holds no model.safetensors (or its .index.json)")
    out = {}
    for name in files:
        with safe_open(str(folder / name), framework="flax") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                out[key] = np.asarray(f.get_tensor(key), np.float32)
    return out


# ----------------------------------------------------------------------------
# Tokenizers.


def _byte_to_char() -> dict[int, str]:
    """The byte-level alphabet of GPT-2-style BPEs: printable Latin-1 bytes stand
    for themselves, the others are moved to code points from 256 up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer_json() -> str:
    """polyjax's byte tokenizer as a Hugging Face tokenizer.json: byte b is id b,
    ``<|endoftext|>`` is 256 (a byte-level BPE with no merges)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: b for b, c in _byte_to_char().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokenizers.EOS_TOKEN, special=True)])
    return tok.to_str()


def export_tokenizer(tokenizer, out: pathlib.Path, max_len: int) -> None:
    """tokenizer.json (or tokenizer.model) and tokenizer_config.json in ``out``."""
    eos = tokenizers.EOS_TOKEN
    if isinstance(tokenizer, tokenizers.ByteTokenizer):
        (out / "tokenizer.json").write_text(byte_tokenizer_json())
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    elif isinstance(tokenizer, tokenizers.HFTokenizer):
        shutil.copyfile(tokenizer.path, out / "tokenizer.json")
        eos = tokenizer._tok.id_to_token(tokenizer.eos_id)
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    else:  # SentencePiece
        shutil.copyfile(tokenizer.path, out / "tokenizer.model")
        eos = tokenizer._sp.id_to_piece(tokenizer.eos_id)
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False}
    config.update(
        eos_token=eos,
        bos_token=None,
        pad_token=None,
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
    )
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


# ----------------------------------------------------------------------------
# The commands.


def write_export(
    out: str | pathlib.Path,
    cfg: ModelConfig,
    params: Params,
    tokenizer,
    dtype: str = "float32",
    note: Mapping[str, Any] | None = None,
) -> str:
    """Write the Hugging Face checkpoint of a model (``flat_params``) and its
    tokenizer to ``out``; returns the architecture ("llama", "olmoe" or "polycom")."""
    from safetensors.flax import save_file

    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r}: valid: {', '.join(DTYPES)}")
    check_exportable(cfg)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_hf(cfg, params)
    save_file(
        {k: jnp.asarray(v, DTYPES[dtype]) for k, v in tensors.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = hf_config(cfg, tokenizer.eos_id)
    config["torch_dtype"] = dtype
    if note:
        config["polyjax"] = dict(note)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    arch = architecture(cfg)
    if arch == "polycom":
        source = importlib.resources.files("polyjax.hf_remote") / REMOTE_FILE
        (out / REMOTE_FILE).write_text(source.read_text())
    export_tokenizer(tokenizer, out, cfg.max_seq_len)
    return arch


def export(workdir: str | pathlib.Path, out: str | pathlib.Path, dtype: str = "float32") -> str:
    """Export the newest checkpoint of ``workdir`` to ``out`` (``write_export``), the
    run's config in config.json under ``polyjax.config`` (``import_`` trains on with it)."""
    run = load_run(workdir)
    note = {"workdir": str(workdir), "step": run.step, "config": run.config}
    return write_export(out, run.model_config, flat_params(run.model), run.tokenizer, dtype, note)


CONFIG_PY = '''"""A run imported from Hugging Face ({source}) by python -m polyjax.hf import.

Train further: python launch.py --config {folder}/config.py --workdir {folder}
"""

import json
import math

import ml_collections

CONFIG = json.loads(r"""{config}""")


def get_config(arg: str = ""):
    return ml_collections.ConfigDict(CONFIG)
'''


def exported_config(hf: Mapping[str, Any]) -> dict[str, Any] | None:
    """The polyjax run's config that ``export`` wrote into a config.json (None: a
    checkpoint from elsewhere, or an older export)."""
    note = hf.get("polyjax")
    config = note.get("config") if isinstance(note, Mapping) else None
    return dict(config) if isinstance(config, Mapping) else None


def import_config(
    hf: Mapping[str, Any], cfg: ModelConfig, tokenizer: str, name: str, seq_len: int | None = None
) -> dict[str, Any]:
    """The imported workdir's config: the model ``cfg`` (read from ``hf``), the tokenizer
    file ``tokenizer``, every device on the data axis, and the training sections (data,
    optim, train) of the exported run when ``hf`` holds them (``exported_config``),
    else the defaults with a batch of lcm(8, devices) and ``seq_len`` 256; a ``seq_len``
    given overrides either (at most the model's context)."""
    run = exported_config(hf) or {}
    data = dict(run.get("data") or {"global_batch": math.lcm(8, jax.device_count())})
    seq_len = seq_len or data.get("seq_len", 256)
    data.update(tokenizer=tokenizer, seq_len=min(seq_len, cfg.max_seq_len))
    return {
        "name": name,
        "model": dataclasses.asdict(cfg),
        "data": dataclasses.asdict(DataConfig.from_dict(data)),
        "optim": dataclasses.asdict(OptimConfig.from_dict(run.get("optim") or {})),
        "train": dataclasses.asdict(TrainConfig.from_dict(run.get("train") or {})),
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1},
    }


def import_(source: str | pathlib.Path, out: str | pathlib.Path, seq_len: int | None = None) -> str:
    """Write a polyjax workdir at ``out`` from the Hugging Face checkpoint in
    ``source`` (see the module docstring; its config: ``import_config``); returns the
    model type it read."""
    source, out = pathlib.Path(source), pathlib.Path(out)
    if not (source / "config.json").is_file():
        raise ValueError(f"{source} holds no config.json")
    hf = json.loads((source / "config.json").read_text())
    model = model_config_from_hf(hf)
    cfg = ModelConfig.from_dict(model)
    params = from_hf(cfg, read_tensors(source))
    if (out / "checkpoints").exists():
        raise ValueError(f"{out} already holds checkpoints; import into a new --out")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer.model"):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
            tokenizer = str((out / name).absolute())
            break
    else:
        raise ValueError(f"{source} holds no tokenizer.json or tokenizer.model")
    config = import_config(hf, cfg, tokenizer, f"hf-{source.name}", seq_len)
    spec = Spec.from_config(config)
    # The step-0 checkpoint of a fresh run of ``spec``, its parameters replaced.
    pipeline = make_pipeline(
        spec.data, process_index=jax.process_index(), process_count=jax.process_count()
    )
    model = shd.create_model(spec.model, spec.mesh, spec.rules, spec.train.seed)
    steps = train.make_steps(spec, model)
    state = steps.init(*nnx.split(model, nnx.Param, ...)[1:])
    shardings = jax.tree.map(lambda x: x.sharding, state.params)
    state = state.replace(params=jax.device_put(model_from_params(cfg, params), shardings))
    with ckpt.Checkpointer(out, every=0, keep=1, async_save=False) as checkpointer:
        checkpointer.save(0, state, pipeline.train_iter().get_state(), spec.config)
    plain = json.dumps(spec.config, indent=2)
    (out / "config.json").write_text(plain)
    (out / "config.py").write_text(CONFIG_PY.format(source=source, folder=out, config=plain))
    return hf["model_type"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m polyjax.hf", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a polyjax run -> a Hugging Face checkpoint")
    ex.add_argument("--workdir", required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)}")
    im = sub.add_parser("import", help="a Hugging Face checkpoint -> a polyjax run")
    im.add_argument("source", help="folder with config.json, safetensors and the tokenizer")
    im.add_argument("--out", required=True, help="the new workdir")
    im.add_argument(
        "--seq_len",
        type=int,
        default=None,
        help="training sequence length (default: the exported run's, else 256)",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            arch = export(args.workdir, args.out, args.dtype)
            print(f"exported {args.workdir} as {arch} to {args.out}")
        else:
            kind = import_(args.source, args.out, args.seq_len)
            hf = json.loads((pathlib.Path(args.source) / "config.json").read_text())
            how = "the exported run's" if exported_config(hf) else "the defaults"
            print(f"imported {kind} from {args.source} into {args.out} (training config: {how})")
    except (ValueError, FileNotFoundError) as e:
        print(f"polyjax.hf: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
