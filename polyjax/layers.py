"""Flax NNX modules: thin holders of parameters around the pure functions.

Every parameter carries its logical axis names as the metadata ``axes``
(``embed``, ``mlp``, ``expert``, ...); ``polyjax.sharding`` maps them to mesh
axes. Parameters that must not be weight-decayed are ``NoDecayParam``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from polyjax import activations as acts
from polyjax import attention, kernels
from polyjax.activations import ActivationConfig

Array = jax.Array


class NoDecayParam(nnx.Param):
    """A trainable parameter that the optimizer leaves out of weight decay
    (PolyCom coefficients, PReLU slopes, norm scales)."""


def trunc_normal(std: float) -> nnx.Initializer:
    """Normal(0, std) truncated at 3 standard deviations."""
    return nnx.initializers.truncated_normal(std, lower=-3.0, upper=3.0)


Shard = Callable[[Array, tuple[str | None, ...]], Array]
"""Constrains an activation to the sharding of its logical axis names
(``polyjax.sharding.ActivationSharding``); ``no_shard`` leaves it alone."""


def no_shard(x: Array, axes: tuple[str | None, ...]) -> Array:
    del axes
    return x


class PolyCoeffs(nnx.Module):
    """The learnable PolyCom coefficients a_1..a_r (ascending) and a_0.

    With ``num_sets`` (for example one set per expert) the weight is (num_sets, r)
    and the bias (num_sets, 1); otherwise (r,) and (1,). Init: a_i = 1/r, a_0 = 0.
    """

    def __init__(self, order: int, num_sets: int | None = None):
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"order must be an integer >= 1, got {order!r}")
        weight, bias = acts.init_coeffs(order)
        if num_sets is None:
            self.weight = NoDecayParam(weight, axes=(None,))
            self.bias = NoDecayParam(bias, axes=(None,))
        else:
            self.weight = NoDecayParam(jnp.tile(weight, (num_sets, 1)), axes=("expert", None))
            self.bias = NoDecayParam(jnp.tile(bias, (num_sets, 1)), axes=("expert", None))


class Activation(nnx.Module):
    """An activation by config, with whatever it learns (coefficients, a slope).

    ``num_sets`` gives one set of coefficients per expert; the caller then picks
    the rows it needs (``coeffs(index)``) before calling with per-row weights.
    The one place that reads ``cfg.kernel``: the activations in ``FUSED`` run
    the fused kernels unless it is "reference"; everything else (and
    "reference") is the jnp function of ``polyjax.activations``, differentiated
    by JAX. Under a mesh (``shard``), a Pallas kernel runs in ``shard_map`` over
    the rows of its input (a Mosaic or Triton call is not partitioned by XLA):
    the caller gives the input's ``spec`` (its mesh axes); the last axis, which
    the kernel reduces over, is whole on each device.
    """

    FUSED = ("polynorm", "polynorm_glu", "polyrelu", "polyrelu_norm")
    """The activations with fused kernels (``polyjax.kernels``)."""

    def __init__(
        self,
        cfg: ActivationConfig,
        num_sets: int | None = None,
        *,
        shard: Shard | None = None,
        rngs: nnx.Rngs,
    ):
        self.cfg, self.shard = cfg, shard or no_shard
        spec = cfg.spec
        self.coeffs = PolyCoeffs(cfg.order, num_sets) if spec.coeffs else None
        self.slope = (
            NoDecayParam(jnp.full((1,), 0.25, jnp.float32), axes=(None,)) if spec.slope else None
        )
        self.rngs = rngs if cfg.name == "rrelu" else None
        self.deterministic = False

    def __call__(
        self,
        x: Array,
        up: Array | None = None,
        *,
        weight: Array | None = None,
        bias: Array | None = None,
        spec: P | None = None,
    ) -> Array:
        """Apply to ``x`` (the gate, for gated activations). ``weight``/``bias``
        override the stored coefficients (per-expert rows gathered by the caller);
        ``spec``: how ``x`` is split over the mesh (None: not split)."""
        cfg = self.cfg
        if self.coeffs is not None:
            weight = self.coeffs.weight[...] if weight is None else weight
            bias = self.coeffs.bias[...] if bias is None else bias
        if cfg.kernel != "reference" and cfg.name in self.FUSED:
            acts.check_inputs(cfg, up, weight, bias)
            return self._fused_sharded(x, up, weight, bias, spec)
        slope = self.slope[...] if self.slope is not None else None
        key = None
        if self.rngs is not None and not self.deterministic:
            key = self.rngs.activation()
        return acts.apply(cfg, x, up, weight=weight, bias=bias, slope=slope, key=key)

    def _fused_sharded(self, x, up, weight, bias, spec: P | None) -> Array:
        mesh = getattr(self.shard, "mesh", None)
        pallas = kernels.resolve_impl(self.cfg.kernel) == "pallas"
        if spec is None or mesh is None or mesh.size == 1 or not pallas:
            return self._fused(x, up, weight, bias)
        rows = P(*tuple(spec)[: x.ndim - 1], None)
        lead, shared = x.shape[:-1], math.prod(jnp.shape(weight)[:-1]) == 1
        if not shared:  # per-row coefficients travel with their rows
            weight = jnp.broadcast_to(weight, (*lead, weight.shape[-1]))
            bias = jnp.broadcast_to(bias, (*lead, bias.shape[-1]))
        coeffs = P() if shared else rows
        return jax.shard_map(
            self._fused,
            mesh=mesh,
            in_specs=(rows, None if up is None else rows, coeffs, coeffs),
            out_specs=rows,
            check_vma=False,
        )(x, up, weight, bias)

    def _fused(self, x: Array, up: Array | None, weight: Array, bias: Array) -> Array:
        name, eps, impl = self.cfg.name, self.cfg.eps, self.cfg.kernel
        if name == "polynorm_glu":
            return kernels.polynorm_glu(x, up, weight, bias, eps, impl=impl)
        if name == "polyrelu":
            return kernels.polyrelu(x, weight, bias, impl=impl)
        if name == "polyrelu_norm":
            x = acts.relu(x)
        return kernels.polynorm(x, weight, bias, eps, impl=impl)


class FFN(nnx.Module):
    """The position-wise FFN: act(x W1) W2, or act(x W_gate, x W_up) W2 if gated.

    ``d_ff`` is the intermediate width as used (apply ``activations.ffn_width``
    first for the equal-parameter rule). No biases.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        act: ActivationConfig,
        *,
        init: nnx.Initializer,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        shard: Shard | None = None,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.shard = no_shard if shard is None else shard
        self.gated = act.spec.gated
        shape_in, shape_out = (d_model, d_ff), (d_ff, d_model)
        self.w_in = nnx.Param(init(rngs.params(), shape_in, param_dtype), axes=("embed", "mlp"))
        if self.gated:
            self.w_up = nnx.Param(init(rngs.params(), shape_in, param_dtype), axes=("embed", "mlp"))
        self.w_out = nnx.Param(init(rngs.params(), shape_out, param_dtype), axes=("mlp", "embed"))
        self.act = Activation(act, shard=self.shard, rngs=rngs)

    FFN_AXES = ("batch", "length", "mlp")

    def _spec(self, axes: tuple[str | None, ...]) -> P | None:
        """The mesh axes of an activation with logical ``axes`` (None: no mesh)."""
        spec = getattr(self.shard, "spec", None)
        return None if spec is None else spec(axes)

    def __call__(self, x_BxLxD: Array) -> Array:
        x_BxLxD = x_BxLxD.astype(self.dtype)
        h_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, self.w_in[...].astype(self.dtype))
        h_BxLxF = checkpoint_name(h_BxLxF, "ffn_hidden")
        if self.gated:
            u_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, self.w_up[...].astype(self.dtype))
            u_BxLxF = checkpoint_name(u_BxLxF, "ffn_hidden")
            h_BxLxF = self.act(h_BxLxF, u_BxLxF, spec=self._spec(self.FFN_AXES))
        else:
            h_BxLxF = self.shard(h_BxLxF, self.FFN_AXES)
            h_BxLxF = self.act(h_BxLxF, spec=self._spec(self.FFN_AXES))
        h_BxLxF = self.shard(h_BxLxF, self.FFN_AXES)
        return jnp.einsum("blf,fd->bld", h_BxLxF, self.w_out[...].astype(self.dtype))


# ----------------------------------------------------------------------------
# Norms, RoPE and attention.


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """x * rsqrt(mean(x^2) + eps) * scale, the mean over the trailing ``scale.ndim``
    axes, in fp32; returned in x's dtype."""
    axes = tuple(range(x.ndim - scale.ndim, x.ndim))
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=axes, keepdims=True) + eps)
    return (x32 * inv * scale.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMS normalisation over the trailing axes of ``shape``, with a learnable gain
    (no decay) whose logical axes are ``axes``."""

    def __init__(
        self,
        shape: tuple[int, ...],
        axes: tuple[str | None, ...],
        *,
        eps: float,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self.eps = eps
        self.scale = NoDecayParam(jnp.ones(shape, param_dtype), axes=axes)

    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.scale[...], self.eps)


def rope(x_BxLxHxK: Array, positions_BxL: Array, theta: float) -> Array:
    """Rotary position embedding (rotate-half layout: the first and second halves
    of each head form the pairs), angles in fp32, returned in x's dtype."""
    half = x_BxLxHxK.shape[-1] // 2
    freq_K2 = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxLx1xK2 = (positions_BxL.astype(jnp.float32)[..., None] * freq_K2)[:, :, None, :]
    sin, cos = jnp.sin(angle_BxLx1xK2), jnp.cos(angle_BxLx1xK2)
    x32 = x_BxLxHxK.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


class Attention(nnx.Module):
    """Causal multi-head attention with grouped KV heads, RoPE and optional QK-norm
    (OLMoE style: RMSNorm over the whole query/key projection). No biases."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        *,
        qk_norm: bool,
        rope_theta: float,
        norm_eps: float,
        init: nnx.Initializer,
        impl: str = "auto",
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        shard: Shard = no_shard,
        rngs: nnx.Rngs,
    ):
        head_dim = d_model // n_heads
        self.rope_theta, self.impl, self.dtype, self.shard = rope_theta, impl, dtype, shard
        axes_in = ("embed", "heads", "kv")
        q_shape, kv_shape = (d_model, n_heads, head_dim), (d_model, n_kv_heads, head_dim)
        self.w_q = nnx.Param(init(rngs.params(), q_shape, param_dtype), axes=axes_in)
        self.w_k = nnx.Param(init(rngs.params(), kv_shape, param_dtype), axes=axes_in)
        self.w_v = nnx.Param(init(rngs.params(), kv_shape, param_dtype), axes=axes_in)
        o_shape = (n_heads, head_dim, d_model)
        self.w_o = nnx.Param(
            init(rngs.params(), o_shape, param_dtype), axes=("heads", "kv", "embed")
        )
        norm = lambda shape: RMSNorm(shape, ("heads", "kv"), eps=norm_eps, param_dtype=param_dtype)
        self.q_norm = norm(q_shape[1:]) if qk_norm else None
        self.k_norm = norm(kv_shape[1:]) if qk_norm else None

    def _qkv(self, x_BxLxD: Array, positions_BxL: Array) -> tuple[Array, Array, Array]:
        """The projections, QK-norm and RoPE: queries, keys and values."""
        x_BxLxD = x_BxLxD.astype(self.dtype)
        proj = lambda w: jnp.einsum("bld,dhk->blhk", x_BxLxD, w[...].astype(self.dtype))
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = proj(self.w_q), proj(self.w_k), proj(self.w_v)
        if self.q_norm is not None:
            q_BxLxHxK, k_BxLxGxK = self.q_norm(q_BxLxHxK), self.k_norm(k_BxLxGxK)
        q_BxLxHxK = rope(q_BxLxHxK, positions_BxL, self.rope_theta)
        k_BxLxGxK = rope(k_BxLxGxK, positions_BxL, self.rope_theta)
        return q_BxLxHxK, k_BxLxGxK, v_BxLxGxK

    def __call__(
        self, x_BxLxD: Array, positions_BxL: Array, segment_ids_BxL: Array | None = None
    ) -> Array:
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = self._qkv(x_BxLxD, positions_BxL)
        axes = ("batch", "length", "heads", "kv")
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = (
            self.shard(t, axes) for t in (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK)
        )
        o_BxLxHxK = attention.causal_attention(
            q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, self.impl, self.shard
        )
        o_BxLxHxK = self.shard(o_BxLxHxK, axes)
        return jnp.einsum("blhk,hkd->bld", o_BxLxHxK, self.w_o[...].astype(self.dtype))

    def decode(
        self,
        x_BxLxD: Array,
        positions_BxL: Array,
        k_BxSxGxK: Array,
        v_BxSxGxK: Array,
        index: Array,
        mask_BxLxS: Array,
    ) -> tuple[Array, Array, Array]:
        """Attention of L new tokens against a KV cache of S slots: their keys and
        values are written at slots ``index .. index + L - 1``, then each query
        attends to the slots ``mask_BxLxS`` allows. Returns (output, keys, values)."""
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = self._qkv(x_BxLxD, positions_BxL)
        axes = ("batch", "length", "heads", "kv")
        write = lambda cache, new: self.shard(
            jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), index, axis=1),
            axes,
        )
        k_BxSxGxK, v_BxSxGxK = write(k_BxSxGxK, k_BxLxGxK), write(v_BxSxGxK, v_BxLxGxK)
        o_BxLxHxK = jax.nn.dot_product_attention(
            self.shard(q_BxLxHxK, axes),
            k_BxSxGxK.astype(q_BxLxHxK.dtype),
            v_BxSxGxK.astype(q_BxLxHxK.dtype),
            mask=mask_BxLxS[:, None],
            implementation="xla",
        )
        o_BxLxHxK = self.shard(o_BxLxHxK, axes)
        out_BxLxD = jnp.einsum("blhk,hkd->bld", o_BxLxHxK, self.w_o[...].astype(self.dtype))
        return out_BxLxD, k_BxSxGxK, v_BxSxGxK
