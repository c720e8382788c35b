"""Flax NNX modules: thin holders of parameters around the pure functions.

Every parameter carries its logical axis names as the metadata ``axes``
(``embed``, ``mlp``, ``expert``, ...); ``polyjax.sharding`` maps them to mesh
axes. Parameters that must not be weight-decayed are ``NoDecayParam``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from polyjax import activations as acts
from polyjax.activations import ActivationConfig

Array = jax.Array


class NoDecayParam(nnx.Param):
    """A trainable parameter that the optimizer leaves out of weight decay
    (PolyCom coefficients, PReLU slopes, norm scales)."""


def trunc_normal(std: float) -> nnx.Initializer:
    """Normal(0, std) truncated at 3 standard deviations."""
    return nnx.initializers.truncated_normal(std, lower=-3.0, upper=3.0)


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
    """

    def __init__(self, cfg: ActivationConfig, num_sets: int | None = None, *, rngs: nnx.Rngs):
        self.cfg = cfg
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
    ) -> Array:
        """Apply to ``x`` (the gate, for gated activations). ``weight``/``bias``
        override the stored coefficients (per-expert rows gathered by the caller)."""
        if self.coeffs is not None:
            weight = self.coeffs.weight[...] if weight is None else weight
            bias = self.coeffs.bias[...] if bias is None else bias
        slope = self.slope[...] if self.slope is not None else None
        key = None
        if self.rngs is not None and not self.deterministic:
            key = self.rngs.activation()
        return acts.apply(self.cfg, x, up, weight=weight, bias=bias, slope=slope, key=key)


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
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.gated = act.spec.gated
        shape_in, shape_out = (d_model, d_ff), (d_ff, d_model)
        self.w_in = nnx.Param(init(rngs.params(), shape_in, param_dtype), axes=("embed", "mlp"))
        if self.gated:
            self.w_up = nnx.Param(init(rngs.params(), shape_in, param_dtype), axes=("embed", "mlp"))
        self.w_out = nnx.Param(init(rngs.params(), shape_out, param_dtype), axes=("mlp", "embed"))
        self.act = Activation(act, rngs=rngs)

    def __call__(self, x_BxLxD: Array) -> Array:
        x_BxLxD = x_BxLxD.astype(self.dtype)
        h_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, self.w_in[...].astype(self.dtype))
        if self.gated:
            u_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, self.w_up[...].astype(self.dtype))
            h_BxLxF = self.act(h_BxLxF, u_BxLxF)
        else:
            h_BxLxF = self.act(h_BxLxF)
        return jnp.einsum("blf,fd->bld", h_BxLxF, self.w_out[...].astype(self.dtype))
