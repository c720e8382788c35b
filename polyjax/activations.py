"""Pure-function activations: Table 4 of the paper, PolyCom of both types, and the registry.

No Flax here. Every function takes arrays (and coefficient arrays where it has
learnable parts) and returns an array of the input's dtype.

Coefficient convention (everywhere in polyjax): ``weight[..., i-1]`` multiplies
the i-th power, so the order ``r = weight.shape[-1]``; ``bias`` is a_0. Leading
dimensions of ``weight`` (and of ``bias`` beyond its last axis) broadcast against
``x.shape[:-1]``, which is how per-expert or per-token coefficients are applied.
The paper's official code stores [cubic, quadratic, linear]: flip to convert.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

# ----------------------------------------------------------------------------
# Table 4: the plain activations.


def relu(x: Array) -> Array:
    return jnp.maximum(x, 0)


def relu2(x: Array) -> Array:
    return jnp.square(jnp.maximum(x, 0))


def relu6(x: Array) -> Array:
    return jnp.minimum(jnp.maximum(x, 0), 6)


def leaky_relu(x: Array, slope: float = 0.01) -> Array:
    return jnp.where(x >= 0, x, slope * x)


RRELU_LOWER, RRELU_UPPER = 1.0 / 8.0, 1.0 / 3.0


def rrelu(
    x: Array,
    key: Array | None = None,
    lower: float = RRELU_LOWER,
    upper: float = RRELU_UPPER,
) -> Array:
    """Randomised leaky ReLU: a slope ~ U(lower, upper) per element when ``key`` is
    given (training); the mean slope (lower + upper) / 2 without one (evaluation)."""
    if key is None:
        slope = (lower + upper) / 2
    else:
        slope = jax.random.uniform(key, x.shape, jnp.float32, lower, upper).astype(x.dtype)
    return jnp.where(x >= 0, x, slope * x)


def prelu(x: Array, slope: Array | float) -> Array:
    """Parametric ReLU; ``slope`` is learnable (broadcast against x)."""
    return jnp.where(x >= 0, x, jnp.asarray(slope, x.dtype) * x)


def tanh(x: Array) -> Array:
    return jnp.tanh(x)


def softplus(x: Array, beta: float = 1.0) -> Array:
    return jnp.logaddexp(beta * x, 0.0) / beta


def mish(x: Array) -> Array:
    return x * jnp.tanh(softplus(x))


def sigmoid(x: Array) -> Array:
    return jax.nn.sigmoid(x)


def silu(x: Array) -> Array:
    return x * jax.nn.sigmoid(x)


def elu(x: Array, alpha: float = 1.0) -> Array:
    return jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0)))


def celu(x: Array, alpha: float = 1.0) -> Array:
    return jnp.maximum(x, 0) + jnp.minimum(0, alpha * jnp.expm1(jnp.minimum(x, 0) / alpha))


def gelu(x: Array) -> Array:
    """Exact GELU, x * Phi(x)."""
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: Array) -> Array:
    """The tanh approximation of GELU."""
    return jax.nn.gelu(x, approximate=True)


def glu(gate: Array, up: Array) -> Array:
    """GLU of two projections: sigmoid(x W) * (x V)."""
    return jax.nn.sigmoid(gate) * up


def swiglu(gate: Array, up: Array) -> Array:
    """SwiGLU of two projections: silu(x W) * (x V)."""
    return silu(gate) * up


# ----------------------------------------------------------------------------
# Polynomials and PolyCom.


def check_coeffs(weight: Array, bias: Array) -> int:
    """The order r of PolyCom coefficients ``weight`` (..., r) and ``bias`` (), (1,)
    or (..., 1), or a ValueError naming the bad argument."""
    order = weight.shape[-1] if weight.ndim else 0
    if order < 1:
        raise ValueError(
            f"weight: the order r = weight.shape[-1] must be >= 1, got weight of shape "
            f"{weight.shape}; pass one coefficient per power 1..r (ascending)"
        )
    if bias.ndim and bias.shape[-1] != 1:
        raise ValueError(f"bias: expected shape (), (1,) or (..., 1), got {bias.shape}")
    return order


def check_eps(eps: float) -> None:
    """A ValueError unless a Python-number ``eps`` is > 0 (traced values pass)."""
    if isinstance(eps, int | float) and not eps > 0:
        raise ValueError(f"eps must be > 0 (it sits inside the rsqrt), got {eps}")


def _coef(weight: Array, i: int) -> Array:
    """The i-th power's coefficient (1-based), shaped to broadcast against x."""
    return weight[..., i - 1, None]


def _bias(bias: Array) -> Array:
    return bias if bias.ndim else bias[None]


def poly(x: Array, weight: Array, bias: Array) -> Array:
    """The plain polynomial a_0 + sum_i a_i x^i."""
    return polycom_type1(x, weight, bias, lambda z: z)


def polycom_type1(x: Array, weight: Array, bias: Array, rho: Callable[[Array], Array]) -> Array:
    """PolyCom Type I: a_0 + sum_{i=1..r} a_i rho(x)^i (Horner form, in fp32)."""
    order = check_coeffs(weight, bias)
    w = weight.astype(jnp.float32)
    z = rho(x).astype(jnp.float32)
    y = _coef(w, order) * z
    for i in range(order - 1, 0, -1):
        y = (y + _coef(w, i)) * z
    return (y + _bias(bias).astype(jnp.float32)).astype(x.dtype)


def polycom_type2(x: Array, weight: Array, bias: Array, rho: Callable[[Array], Array]) -> Array:
    """PolyCom Type II: a_0 + sum_{i=1..r} a_i rho(x^i)."""
    order = check_coeffs(weight, bias)
    w = weight.astype(x.dtype)
    y = _bias(bias).astype(x.dtype)
    for i in range(1, order + 1):
        y = y + _coef(w, i) * rho(x**i)
    return y.astype(x.dtype)


def rms_normalize(x: Array, eps: float = 1e-6) -> Array:
    """x / sqrt(mean(x^2) + eps) over the last axis, in fp32, no gain.

    Written with sqrt rather than rsqrt for autodiff: the derivative rule of
    rsqrt(v) forms rsqrt(v) / v, which underflows fp32 when v is large (v ~ 1e28
    for the 6th power of |x| ~ 100), while 1 / sqrt(v) differentiates through
    1 / sqrt(v)^2 and stays in range."""
    x32 = x.astype(jnp.float32)
    return x32 / jnp.sqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


def polyrelu(x: Array, weight: Array, bias: Array) -> Array:
    """PolyReLU (Type I with ReLU): a_0 + sum_i a_i relu(x)^i."""
    return polycom_type1(x, weight, bias, relu)


def polyprelu(x: Array, weight: Array, bias: Array, slope: Array | float = 0.25) -> Array:
    """PolyPReLU (Type I with PReLU): a_0 + sum_i a_i prelu(x)^i."""
    return polycom_type1(x, weight, bias, lambda z: prelu(z, slope))


def polynorm(x: Array, weight: Array, bias: Array, eps: float = 1e-6) -> Array:
    """PolyNorm (Type II with RMS normalisation), the reference implementation.

    y = a_0 + sum_i a_i x^i rsqrt(mean(x^{2i}) + eps), the mean over the last axis,
    each power with its own statistic. Computed in fp32, returned in x's dtype.
    """
    check_eps(eps)
    check_coeffs(weight, bias)
    y = polycom_type2(
        x.astype(jnp.float32),
        weight.astype(jnp.float32),
        bias.astype(jnp.float32),
        lambda z: rms_normalize(z, eps),
    )
    return y.astype(x.dtype)


def polyrelu_norm(x: Array, weight: Array, bias: Array, eps: float = 1e-6) -> Array:
    """PolyReLU-Norm: ReLU, then the normalised powers of PolyNorm."""
    return polynorm(relu(x), weight, bias, eps)


def polynorm_glu(gate: Array, up: Array, weight: Array, bias: Array, eps: float = 1e-6) -> Array:
    """The gated PolyNorm of the Motif models: PolyNorm(x W_gate) * (x W_up)."""
    return polynorm(gate, weight, bias, eps) * up


# ----------------------------------------------------------------------------
# The registry: config names -> how to build and apply an activation.

BASES: dict[str, Callable[[Array], Array]] = {
    "identity": lambda x: x,
    "relu": relu,
    "relu2": relu2,
    "relu6": relu6,
    "leaky_relu": leaky_relu,
    "rrelu": rrelu,
    "tanh": tanh,
    "softplus": softplus,
    "mish": mish,
    "sigmoid": sigmoid,
    "silu": silu,
    "elu": elu,
    "celu": celu,
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "rms_norm": rms_normalize,
}
"""Base functions rho for the generic ``polycom`` activation (Type I or II)."""


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """How an activation named in a config behaves.

    gated: takes (gate, up), so the FFN has two input projections.
    coeffs: has learnable PolyCom coefficients (weight of shape (r,), bias).
    slope: has a learnable PReLU slope.
    """

    name: str
    gated: bool = False
    coeffs: bool = False
    slope: bool = False
    description: str = ""


_SPECS = [
    ActivationSpec("relu", description="max(x, 0)"),
    ActivationSpec("relu2", description="max(x, 0)^2"),
    ActivationSpec("relu6", description="min(max(x, 0), 6)"),
    ActivationSpec("leaky_relu", description="x if x >= 0 else 0.01 x"),
    ActivationSpec("rrelu", description="leaky ReLU with a random slope in training"),
    ActivationSpec("prelu", slope=True, description="leaky ReLU with a learnable slope"),
    ActivationSpec("tanh"),
    ActivationSpec("softplus"),
    ActivationSpec("mish"),
    ActivationSpec("sigmoid"),
    ActivationSpec("silu"),
    ActivationSpec("elu"),
    ActivationSpec("celu"),
    ActivationSpec("gelu", description="exact GELU"),
    ActivationSpec("gelu_tanh", description="tanh-approximated GELU"),
    ActivationSpec("glu", gated=True, description="sigmoid(xW) * xV"),
    ActivationSpec("swiglu", gated=True, description="silu(xW) * xV"),
    ActivationSpec("poly", coeffs=True, description="a_0 + sum a_i x^i"),
    ActivationSpec("polycom", coeffs=True, description="PolyCom of any base and type"),
    ActivationSpec("polyrelu", coeffs=True, description="PolyCom I with ReLU"),
    ActivationSpec("polyprelu", coeffs=True, slope=True, description="PolyCom I with PReLU"),
    ActivationSpec("polynorm", coeffs=True, description="PolyCom II with RMS norm"),
    ActivationSpec("polyrelu_norm", coeffs=True, description="ReLU then PolyNorm"),
    ActivationSpec("polynorm_glu", gated=True, coeffs=True, description="PolyNorm(xW) * xV"),
]
REGISTRY: dict[str, ActivationSpec] = {s.name: s for s in _SPECS}


def get_spec(name: str) -> ActivationSpec:
    """The registry entry for ``name``, or a ValueError listing the valid names."""
    if name not in REGISTRY:
        raise ValueError(f"unknown activation {name!r}; valid names: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


KERNELS = ("xla", "pallas", "auto", "reference")
"""The values of ``ActivationConfig.kernel``."""


@dataclasses.dataclass(frozen=True)
class ActivationConfig:
    """Everything that selects an activation, as read from a config.

    name: a key of REGISTRY. order: r for PolyCom. eps: PolyNorm's epsilon.
    base / polycom_type: rho and the type (1 or 2) of the generic ``polycom``.
    kernel: how PolyNorm, PolyNorm-GLU, PolyReLU and PolyReLU-Norm are computed
    (``KERNELS``; the other activations are always plain jnp): "xla" the fused
    custom VJP in jnp, "pallas" the Pallas kernels, "auto" Pallas only where it
    measured faster, "reference" the jnp functions above differentiated by JAX
    (the only choice that supports forward-mode autodiff). docs/kernels.md.
    """

    name: str = "polynorm"
    order: int = 3
    eps: float = 1e-6
    base: str = "relu"
    polycom_type: int = 1
    kernel: str = "xla"

    def __post_init__(self):
        spec = get_spec(self.name)
        if spec.coeffs and (not isinstance(self.order, int) or self.order < 1):
            raise ValueError(f"activation.order must be an integer >= 1, got {self.order!r}")
        if not self.eps > 0:
            raise ValueError(f"activation.eps must be > 0, got {self.eps!r}")
        if self.name == "polycom":
            if self.base not in BASES:
                raise ValueError(
                    f"activation.base: unknown base function {self.base!r}; "
                    f"valid: {', '.join(sorted(BASES))}"
                )
            if self.polycom_type not in (1, 2):
                raise ValueError(
                    f"activation.polycom_type must be 1 or 2, got {self.polycom_type!r}"
                )
        if self.kernel not in KERNELS:
            raise ValueError(
                f"activation.kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}"
            )

    @property
    def spec(self) -> ActivationSpec:
        return REGISTRY[self.name]


def init_coeffs(order: int) -> tuple[Array, Array]:
    """The paper's init: a_i = 1/r for i = 1..r, a_0 = 0."""
    return jnp.full((order,), 1.0 / order, jnp.float32), jnp.zeros((1,), jnp.float32)


def check_inputs(
    cfg: ActivationConfig, up: Array | None, weight: Array | None, bias: Array | None
) -> None:
    """A ValueError unless the arguments fit the activation ``cfg`` names: ``up``
    exactly for gated ones, coefficients of the configured order for PolyCom."""
    name, spec = cfg.name, cfg.spec
    if spec.gated != (up is not None):
        raise ValueError(f"activation {name!r} {'needs' if spec.gated else 'takes no'} `up`")
    if spec.coeffs and (weight is None or bias is None):
        raise ValueError(f"activation {name!r} needs its coefficients `weight` and `bias`")
    if spec.coeffs and weight.shape[-1:] != (cfg.order,):
        raise ValueError(
            f"weight: activation {name!r} has order {cfg.order} but weight has shape "
            f"{weight.shape}; its last axis must hold the {cfg.order} coefficients"
        )


def apply(
    cfg: ActivationConfig,
    x: Array,
    up: Array | None = None,
    *,
    weight: Array | None = None,
    bias: Array | None = None,
    slope: Array | None = None,
    key: Array | None = None,
) -> Array:
    """Apply the activation ``cfg`` names, given its learnable parts, as plain jnp
    (the reference: JAX differentiates it; ``cfg.kernel`` is not read here, the
    fused kernels are chosen by ``polyjax.layers.Activation``).

    ``up`` is the second projection of a gated activation; ``key`` makes RReLU
    sample its slopes (training). Coefficients follow the module convention.
    """
    check_inputs(cfg, up, weight, bias)
    name = cfg.name
    if name == "glu":
        return glu(x, up)
    if name == "swiglu":
        return swiglu(x, up)
    if name == "polynorm_glu":
        return polynorm_glu(x, up, weight, bias, cfg.eps)
    if name == "polynorm":
        return polynorm(x, weight, bias, cfg.eps)
    if name == "polyrelu":
        return polyrelu(x, weight, bias)
    if name == "polyrelu_norm":
        return polyrelu_norm(x, weight, bias, cfg.eps)
    if name == "polyprelu":
        return polyprelu(x, weight, bias, slope)
    if name == "poly":
        return poly(x, weight, bias)
    if name == "polycom":
        rho = BASES[cfg.base]
        if cfg.base == "rms_norm":
            rho = lambda z: rms_normalize(z, cfg.eps).astype(z.dtype)
        fn = polycom_type1 if cfg.polycom_type == 1 else polycom_type2
        return fn(x, weight, bias, rho)
    if name == "prelu":
        return prelu(x, slope)
    if name == "rrelu":
        return rrelu(x, key)
    return BASES[name](x)


def ffn_width(base_width: int, gated: bool, multiple_of: int = 1) -> int:
    """The equal-parameter rule: a gated FFN (three matrices) gets 2/3 of the width
    of a non-gated one (two matrices), rounded to a multiple of ``multiple_of``.
    ffn_width(8256, True) == 5504 and ffn_width(1536, True) == 1024, as in the paper."""
    if not gated:
        return base_width
    return multiple_of * max(1, math.floor(2 * base_width / 3 / multiple_of + 0.5))
