"""The decoder: a Llama-style dense transformer or an OLMoE-style MoE, by config.

Token embedding, pre-RMSNorm blocks (RoPE attention with grouped KV heads and
optional QK-norm; the FFN or the MoE FFN), a final norm and an untied head. No
linear biases. Parameters in ``param_dtype``, compute in ``dtype``, logits in fp32.
Layers are a Python list or, with ``scan_layers``, one stacked block scanned over;
each layer is rematerialised by the named ``remat`` policy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from polyjax import activations as acts
from polyjax.activations import ActivationConfig
from polyjax.attention import IMPLS as ATTENTION_IMPLS
from polyjax.fields import from_mapping
from polyjax.layers import FFN, Attention, RMSNorm, Shard, no_shard, trunc_normal
from polyjax.moe import DISPATCHES, MoE

Array = jax.Array

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_ffn_in": jax.checkpoint_policies.save_only_these_names("ffn_in"),
    "save_block": jax.checkpoint_policies.save_only_these_names("attn_out", "ffn_in", "ffn_out"),
    "save_ffn_hidden": jax.checkpoint_policies.save_only_these_names("ffn_hidden"),
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
"""Remat policies: what each layer keeps for the backward pass (the rest is recomputed
from the layer's input). "none" keeps every activation, "full" nothing. The named ones
keep tensors tagged with ``checkpoint_name`` in ``Block`` and ``FFN``: "save_ffn_in"
the FFN's input (the normalised residual, B x L x D), "save_block" that and the
attention and FFN outputs, "save_ffn_hidden" the activation's input(s) (the W_in and,
gated, W_up outputs, B x L x F; the activation itself, e.g. PolyNorm, whose backward
needs only its input, is recomputed; tagged in the dense FFN only). "save_dots" keeps
every matmul output (attention scores included), "save_dots_no_batch" those without
batch dimensions (the projections). docs/scale.md has measured memory and FLOPs."""

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _fail(field: str, value: Any, expected: str) -> None:
    raise ValueError(f"{field}={value!r}: {expected}")


def _check_int(field: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(field, value, f"must be an integer >= {minimum}")


def _check_choice(field: str, value: Any, choices) -> None:
    if value not in choices:
        _fail(field, value, f"must be one of {', '.join(map(str, choices))}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """The MoE FFN. ``d_expert`` is one expert's intermediate width as used (apply
    ``activations.ffn_width`` for the equal-parameter rule)."""

    num_experts: int = 8
    top_k: int = 2
    d_expert: int = 64
    renormalize: bool = False
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    lb_coef: float = 0.01
    z_coef: float = 0.001
    per_expert_coeffs: bool = False

    def __post_init__(self):
        _check_int("moe.num_experts", self.num_experts)
        _check_int("moe.top_k", self.top_k)
        _check_int("moe.d_expert", self.d_expert)
        if self.top_k > self.num_experts:
            _fail("moe.top_k", self.top_k, f"must be <= moe.num_experts={self.num_experts}")
        _check_choice("moe.dispatch", self.dispatch, DISPATCHES)
        if not self.capacity_factor > 0:
            _fail("moe.capacity_factor", self.capacity_factor, "must be > 0")
        for name in ("lb_coef", "z_coef"):
            if not getattr(self, name) >= 0:
                _fail(f"moe.{name}", getattr(self, name), "must be >= 0")

    @classmethod
    def from_dict(cls, d: Mapping) -> MoEConfig:
        return from_mapping(cls, d, "moe")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The model. ``d_ff`` is the dense FFN's intermediate width as used (None for
    MoE models, whose width is ``moe.d_expert``); ``n_kv_heads`` None = ``n_heads``.
    ``attention``: "auto" (splash on TPU, cuDNN on GPU), "xla", "cudnn", "splash"
    (``polyjax.attention``).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    d_ff: int | None = None
    max_seq_len: int
    activation: ActivationConfig = dataclasses.field(default_factory=ActivationConfig)
    moe: MoEConfig | None = None
    qk_norm: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    init_truncated: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False
    attention: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            _check_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            _fail("n_heads", self.n_heads, f"must divide d_model={self.d_model}")
        if (self.d_model // self.n_heads) % 2:
            _fail("n_heads", self.n_heads, "d_model / n_heads (the head size) must be even (RoPE)")
        if self.n_kv_heads is not None:
            _check_int("n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                _fail("n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads}")
        if not isinstance(self.activation, ActivationConfig):
            _fail("activation", self.activation, "must be an ActivationConfig (or a dict)")
        if self.moe is None:
            _check_int("d_ff", self.d_ff)
        elif not isinstance(self.moe, MoEConfig):
            _fail("moe", self.moe, "must be a MoEConfig, a dict or None")
        elif self.d_ff is not None:
            _fail("d_ff", self.d_ff, "must be unset for an MoE model (set moe.d_expert)")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                _fail(name, getattr(self, name), "must be > 0")
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        _check_choice("remat", self.remat, REMAT_POLICIES)
        _check_choice("attention", self.attention, ATTENTION_IMPLS)

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelConfig:
        """From a (nested) mapping; ``activation`` and ``moe`` may be dicts."""

        def activation(v):
            if isinstance(v, ActivationConfig):
                return v
            if isinstance(v, str):
                return ActivationConfig(v)
            return from_mapping(ActivationConfig, v, "activation")

        def moe(v):
            return v if v is None or isinstance(v, MoEConfig) else MoEConfig.from_dict(v)

        return from_mapping(cls, d, "model", {"activation": activation, "moe": moe})


class Block(nnx.Module):
    """One pre-norm layer: x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, cfg: ModelConfig, *, shard: Shard, rngs: nnx.Rngs):
        std = cfg.init_std
        init = trunc_normal(std) if cfg.init_truncated else nnx.initializers.normal(std)
        dt, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        D, eps = cfg.d_model, cfg.norm_eps
        self.shard = shard
        self.attn_norm = RMSNorm((D,), ("embed",), eps=eps, param_dtype=pdt)
        self.attn = Attention(
            D,
            cfg.n_heads,
            cfg.kv_heads,
            qk_norm=cfg.qk_norm,
            rope_theta=cfg.rope_theta,
            norm_eps=eps,
            init=init,
            impl=cfg.attention,
            dtype=dt,
            param_dtype=pdt,
            shard=shard,
            rngs=rngs,
        )
        self.ffn_norm = RMSNorm((D,), ("embed",), eps=eps, param_dtype=pdt)
        common = dict(init=init, dtype=dt, param_dtype=pdt, shard=shard, rngs=rngs)
        m = cfg.moe
        if m is None:
            self.ffn = FFN(D, cfg.d_ff, cfg.activation, **common)
        else:
            self.ffn = MoE(
                D,
                m.d_expert,
                cfg.activation,
                num_experts=m.num_experts,
                top_k=m.top_k,
                renormalize=m.renormalize,
                dispatch=m.dispatch,
                capacity_factor=m.capacity_factor,
                per_expert_coeffs=m.per_expert_coeffs,
                **common,
            )

    def __call__(
        self, x_BxLxD: Array, positions_BxL: Array, segment_ids_BxL: Array | None
    ) -> tuple[Array, dict[str, Array]]:
        axes = ("batch", "length", "act_embed")
        a_BxLxD = self.attn(self.attn_norm(x_BxLxD), positions_BxL, segment_ids_BxL)
        h_BxLxD = self.shard(x_BxLxD + checkpoint_name(a_BxLxD, "attn_out"), axes)
        f = self.ffn(checkpoint_name(self.ffn_norm(h_BxLxD), "ffn_in"))
        f_BxLxD, stats = f if isinstance(self.ffn, MoE) else (f, {})
        f_BxLxD = checkpoint_name(f_BxLxD.astype(h_BxLxD.dtype), "ffn_out")
        return self.shard(h_BxLxD + f_BxLxD, axes), stats

    def decode(
        self,
        x_BxLxD: Array,
        positions_BxL: Array,
        k_BxSxGxK: Array,
        v_BxSxGxK: Array,
        index: Array,
        mask_BxLxS: Array,
    ) -> tuple[Array, Array, Array]:
        """The layer on L new tokens with this layer's KV cache (``Attention.decode``)."""
        axes = ("batch", "length", "act_embed")
        a_BxLxD, k_BxSxGxK, v_BxSxGxK = self.attn.decode(
            self.attn_norm(x_BxLxD), positions_BxL, k_BxSxGxK, v_BxSxGxK, index, mask_BxLxS
        )
        h_BxLxD = self.shard(x_BxLxD + a_BxLxD, axes)
        f = self.ffn(self.ffn_norm(h_BxLxD))
        f_BxLxD = f[0] if isinstance(self.ffn, MoE) else f
        return self.shard(h_BxLxD + f_BxLxD.astype(h_BxLxD.dtype), axes), k_BxSxGxK, v_BxSxGxK


CACHE_AXES = ("layers", "batch", "length", "heads", "kv")
"""Logical axes of the KV cache's keys and values: layers x B x S x G x K."""


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict[str, Array]:
    """An empty KV cache for ``Transformer.decode``: keys "k" and "v", each
    n_layers x batch x length x n_kv_heads x head_dim in the compute dtype."""
    shape = (cfg.n_layers, batch, length, cfg.kv_heads, cfg.d_model // cfg.n_heads)
    zeros = jnp.zeros(shape, DTYPES[cfg.dtype])
    return {"k": zeros, "v": zeros}


class Transformer(nnx.Module):
    """The decoder. ``shard`` constrains the main activations to their logical axes
    (``polyjax.sharding.create_model`` passes one); left out, XLA decides."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, shard: Shard | None = None):
        self.cfg = cfg
        self.shard = no_shard if shard is None else shard
        std = cfg.init_std
        init = trunc_normal(std) if cfg.init_truncated else nnx.initializers.normal(std)
        pdt = DTYPES[cfg.param_dtype]
        V, D = cfg.vocab_size, cfg.d_model
        self.embed = nnx.Param(init(rngs.params(), (V, D), pdt), axes=("vocab", "embed"))
        if cfg.scan_layers:
            self.layers = _stacked_blocks(cfg, self.shard, rngs)
        else:
            self.layers = nnx.List(
                [Block(cfg, shard=self.shard, rngs=rngs) for _ in range(cfg.n_layers)]
            )
        self.final_norm = RMSNorm((D,), ("embed",), eps=cfg.norm_eps, param_dtype=pdt)
        self.head = nnx.Param(init(rngs.params(), (D, V), pdt), axes=("embed", "vocab"))

    def __call__(
        self,
        tokens_BxL: Array,
        *,
        positions_BxL: Array | None = None,
        segment_ids_BxL: Array | None = None,
        return_hidden: bool = False,
    ) -> tuple[Array, dict[str, Array]]:
        """Logits and the aux terms; ``return_hidden`` adds aux["hidden_states"],
        the embedding output and every block's output, (n_layers + 1) x B x L x D."""
        cfg = self.cfg
        dt = DTYPES[cfg.dtype]
        batch, seq_len = tokens_BxL.shape
        if seq_len > cfg.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len={cfg.max_seq_len}")
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
        x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(dt)
        x_BxLxD = self.shard(x_BxLxD, ("batch", "length", "act_embed"))
        x0_BxLxD = x_BxLxD

        def layer(block: Block, x_BxLxD: Array):
            y_BxLxD, stats = block(x_BxLxD, positions_BxL, segment_ids_BxL)
            return y_BxLxD, ({**stats, "hidden": y_BxLxD} if return_hidden else stats)

        if cfg.remat != "none":
            # Under scan the loop keeps XLA from merging the recomputation with the
            # forward pass; a Python loop needs remat's own barrier (prevent_cse).
            policy = REMAT_POLICIES[cfg.remat]
            layer = nnx.remat(layer, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            scan = nnx.scan(layer, in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
            x_BxLxD, stats = scan(self.layers, x_BxLxD)
        else:
            per_layer = []
            for block in self.layers:
                x_BxLxD, s = layer(block, x_BxLxD)
                per_layer.append(s)
            stats = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)

        aux = self._aux(stats)
        if return_hidden:
            aux["hidden_states"] = jnp.concatenate([x0_BxLxD[None], stats["hidden"]])
        h_BxLxD = self.final_norm(x_BxLxD)
        logits_BxLxV = jnp.einsum(
            "bld,dv->blv",
            h_BxLxD,
            self.head[...].astype(dt),
            preferred_element_type=jnp.float32,
        )
        logits_BxLxV = self.shard(logits_BxLxV, ("batch", "length", "vocab"))
        return logits_BxLxV, aux

    def decode(
        self, tokens_BxL: Array, cache: dict[str, Array], index: Array, start_B: Array
    ) -> tuple[Array, dict[str, Array]]:
        """Logits of L new tokens given the KV cache of the earlier ones (from
        ``init_cache``), and the updated cache: the inference entry point.

        The new tokens fill cache slots ``index .. index + L - 1``. Row b's text
        begins at slot ``start_B[b]`` (slots before it are left padding, never
        attended to); its positions count from there. A prefill is ``decode``
        of the (left-padded) prompts at ``index`` 0, a step ``decode`` of one
        token at the next slot. The MoE layers run their configured dispatch (set
        ``moe.dispatch="dropless"`` so that no token is dropped)."""
        cfg = self.cfg
        dt = DTYPES[cfg.dtype]
        _, seq_len = tokens_BxL.shape
        slots_S = jnp.arange(cache["k"].shape[2])
        cols_L = index + jnp.arange(seq_len)
        start_Bx1x1 = start_B[:, None, None]
        positions_BxL = jnp.maximum(cols_L[None, :] - start_B[:, None], 0)
        # Causal over the slots, never into the left padding (a padding query, whose
        # output is never used, sees itself so that its softmax stays finite).
        mask_BxLxS = (slots_S[None, None, :] <= cols_L[None, :, None]) & (
            (slots_S[None, None, :] >= start_Bx1x1) | (cols_L[None, :, None] < start_Bx1x1)
        )
        x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(dt)
        x_BxLxD = self.shard(x_BxLxD, ("batch", "length", "act_embed"))

        def layer(block: Block, x_BxLxD: Array, k_BxSxGxK: Array, v_BxSxGxK: Array):
            y_BxLxD, k_BxSxGxK, v_BxSxGxK = block.decode(
                x_BxLxD, positions_BxL, k_BxSxGxK, v_BxSxGxK, index, mask_BxLxS
            )
            return y_BxLxD, (k_BxSxGxK, v_BxSxGxK)

        if cfg.scan_layers:
            # A plain lax.scan over the stacked layer state (an nnx transform would
            # refuse modules from an enclosing trace, as in a decoding while_loop).
            graphdef, stacked = nnx.split(self.layers)

            def body(x_BxLxD, xs):
                state, k_BxSxGxK, v_BxSxGxK = xs
                return layer(nnx.merge(graphdef, state), x_BxLxD, k_BxSxGxK, v_BxSxGxK)

            x_BxLxD, (k, v) = jax.lax.scan(body, x_BxLxD, (stacked, cache["k"], cache["v"]))
        else:
            k, v = cache["k"], cache["v"]
            for i, block in enumerate(self.layers):
                x_BxLxD, (k_i, v_i) = layer(block, x_BxLxD, k[i], v[i])
                k, v = k.at[i].set(k_i), v.at[i].set(v_i)
        h_BxLxD = self.final_norm(x_BxLxD)
        logits_BxLxV = jnp.einsum(
            "bld,dv->blv",
            h_BxLxD,
            self.head[...].astype(dt),
            preferred_element_type=jnp.float32,
        )
        logits_BxLxV = self.shard(logits_BxLxV, ("batch", "length", "vocab"))
        return logits_BxLxV, {"k": self.shard(k, CACHE_AXES), "v": self.shard(v, CACHE_AXES)}

    def _aux(self, stats: dict[str, Array]) -> dict[str, Array]:
        """The MoE terms for the trainer (layer means of the losses); {} if dense."""
        m = self.cfg.moe
        if m is None:
            return {}
        lb, z = jnp.mean(stats["lb"]), jnp.mean(stats["z"])
        return {
            "moe_aux_loss": m.lb_coef * lb + m.z_coef * z,
            "moe_lb_loss": lb,
            "moe_z_loss": z,
            "expert_load": stats["load"],
            "dropped_tokens": jnp.sum(stats["dropped"]),
        }


def _stacked_blocks(cfg: ModelConfig, shard: Shard, rngs: nnx.Rngs) -> Block:
    """``n_layers`` blocks as one Block whose parameters have a leading layer axis
    (logical name "layers"), initialised with independent keys."""

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> Block:
        return Block(cfg, shard=shard, rngs=rngs)

    blocks = make(rngs)
    for _, var in nnx.iter_graph(blocks):
        if isinstance(var, nnx.Variable) and "axes" in var.get_metadata():
            var.set_metadata(axes=("layers", *var.get_metadata()["axes"]))
    return blocks


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from shapes alone (no allocation): "total", "active" (per
    token: only top_k of the experts), "embedding" (the input table) and "head"."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    total = expert = 0
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        size = math.prod(var.get_value().shape)
        total += size
        if "expert" in var.get_metadata().get("axes", ()):
            expert += size
    active = total
    if cfg.moe is not None:
        active = total - expert + expert * cfg.moe.top_k // cfg.moe.num_experts
    return {
        "total": total,
        "active": active,
        "embedding": cfg.vocab_size * cfg.d_model,
        "head": cfg.d_model * cfg.vocab_size,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM, appendix B): 6 x the active matmul parameters
    (all but the input embedding) + 12 x layers x d_model x seq_len for attention,
    with no discount for the causal mask."""
    counts = param_counts(cfg)
    return 6.0 * (counts["active"] - counts["embedding"]) + 12.0 * (
        cfg.n_layers * cfg.d_model * seq_len
    )


PRESETS = {
    # CPU sizes: seconds ("tiny") and minutes ("small") on 2 cores.
    ("dense", "tiny"): dict(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, ffn_base=192, max_seq_len=128
    ),
    ("dense", "small"): dict(
        vocab_size=1024, d_model=256, n_layers=4, n_heads=8, ffn_base=768, max_seq_len=256
    ),
    ("moe", "tiny"): dict(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, ffn_base=96, max_seq_len=128,
        num_experts=8, top_k=2,
    ),
    ("moe", "small"): dict(
        vocab_size=1024, d_model=256, n_layers=4, n_heads=8, ffn_base=384, max_seq_len=256,
        num_experts=8, top_k=2,
    ),
    # The paper's models (docs/paper_models.md): the 1B dense model and OLMoE-1B-7B.
    ("dense", "1b"): dict(
        vocab_size=32000, d_model=2048, n_layers=24, n_heads=16, ffn_base=8256, max_seq_len=4096,
        init_std=0.013975, dtype="bfloat16", remat="save_dots_no_batch", scan_layers=True,
    ),
    ("moe", "1b"): dict(
        vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, ffn_base=1536, max_seq_len=4096,
        num_experts=64, top_k=8, dtype="bfloat16", remat="save_dots_no_batch",
        scan_layers=True,
    ),
}  # fmt: skip
"""(family, size) -> the model's fields, and ``ffn_base``: the FFN (or expert) width
of an ungated activation (``activations.ffn_width`` gives the gated one); the MoE
ones also give ``num_experts`` and ``top_k``."""


def preset(family: str, size: str, act: str) -> dict:
    """A config dict (for ``ModelConfig.from_dict``): the paper's 1B dense model and
    OLMoE-1B-7B ("1b"), or CPU-sized "tiny"/"small" ones, with activation ``act``.
    Gated activations get 2/3 of the width (SwiGLU 5504 vs 8256; experts 1024 vs 1536).
    """
    _check_choice("family", family, ("dense", "moe"))
    _check_choice("size", size, ("tiny", "small", "1b"))
    gated = acts.get_spec(act).gated
    cfg = dict(PRESETS[family, size])
    width = acts.ffn_width(cfg.pop("ffn_base"), gated, multiple_of=32)
    cfg["activation"] = dict(name=act)
    if family == "dense":
        cfg["d_ff"] = width
    else:
        moe = dict(d_expert=width, num_experts=cfg.pop("num_experts"), top_k=cfg.pop("top_k"))
        cfg.update(moe=moe, qk_norm=True, init_std=0.02, init_truncated=True)
    return cfg
