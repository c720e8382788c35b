"""OLMoE-style mixture of experts: router, auxiliary losses, two dispatches, the layer.

- Router: softmax over all experts, then the top-k probabilities as gate weights,
  not renormalised unless asked (Mixtral-style).
- Dropless dispatch: the (token, slot) assignments sorted by expert and two grouped
  matmuls (``jax.lax.ragged_dot``); nothing is dropped.
- Capacity dispatch: per sequence, each expert takes at most C assignments (first
  choices before second ones, earlier tokens first), einsum with one-hot dispatch
  and combine tensors; the overflow is dropped and counted.

Expert activations are any of the registry's; PolyCom coefficients are shared by the
layer's experts or one set per expert (rows gathered per assignment). PolyNorm
normalises each token over the expert's full intermediate width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from polyjax.activations import ActivationConfig
from polyjax.layers import Activation, Shard, no_shard

Array = jax.Array

DISPATCHES = ("dropless", "capacity")


def route(logits_TxE: Array, top_k: int, renormalize: bool = False) -> tuple[Array, Array, Array]:
    """Softmax over all experts, then top-k. Returns (gates_TxK, experts_TxK, probs_TxE);
    the gates are renormalised to sum to 1 only with ``renormalize``."""
    probs_TxE = jax.nn.softmax(logits_TxE.astype(jnp.float32), axis=-1)
    gates_TxK, experts_TxK = jax.lax.top_k(probs_TxE, top_k)
    if renormalize:
        gates_TxK = gates_TxK / jnp.sum(gates_TxK, axis=-1, keepdims=True)
    return gates_TxK, experts_TxK, probs_TxE


def expert_load(experts_TxK: Array, num_experts: int) -> Array:
    """The fraction of the (token, slot) assignments that go to each expert."""
    onehot_TxKxE = jax.nn.one_hot(experts_TxK, num_experts, dtype=jnp.float32)
    return jnp.sum(onehot_TxKxE, axis=(0, 1)) / experts_TxK.size


def load_balancing_loss(probs_TxE: Array, experts_TxK: Array) -> Array:
    """E * sum_e f_e * P_e: f_e the share of assignments to expert e, P_e its mean
    router probability. 1 when both are uniform."""
    num_experts = probs_TxE.shape[-1]
    f_E = expert_load(experts_TxK, num_experts)
    return num_experts * jnp.sum(f_E * jnp.mean(probs_TxE, axis=0))


def router_z_loss(logits_TxE: Array) -> Array:
    """mean over tokens of logsumexp(router logits)^2."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TxE.astype(jnp.float32), axis=-1)))


def capacity(tokens_per_group: int, num_experts: int, top_k: int, factor: float) -> int:
    """Assignments one expert takes per group: ceil(factor * tokens * k / E)."""
    return max(1, math.ceil(factor * tokens_per_group * top_k / num_experts))


class MoE(nnx.Module):
    """The MoE FFN of one layer: a router and ``num_experts`` FFNs of width ``d_expert``.

    Returns the output and per-layer statistics: ``lb`` and ``z`` (the unweighted
    load-balancing and z losses), ``load`` (per-expert assignment shares) and
    ``dropped`` (assignments the capacity dispatch dropped; 0 when dropless).
    """

    def __init__(
        self,
        d_model: int,
        d_expert: int,
        act: ActivationConfig,
        *,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        dispatch: str,
        capacity_factor: float,
        per_expert_coeffs: bool,
        init: nnx.Initializer,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        shard: Shard = no_shard,
        rngs: nnx.Rngs,
    ):
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.dispatch, self.capacity_factor = dispatch, capacity_factor
        self.dtype, self.shard = dtype, shard
        self.gated = act.spec.gated
        E, D, F = num_experts, d_model, d_expert
        self.router = nnx.Param(init(rngs.params(), (D, E), param_dtype), axes=("embed", None))
        axes_in, axes_out = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
        self.w_in = nnx.Param(init(rngs.params(), (E, D, F), param_dtype), axes=axes_in)
        if self.gated:
            self.w_up = nnx.Param(init(rngs.params(), (E, D, F), param_dtype), axes=axes_in)
        self.w_out = nnx.Param(init(rngs.params(), (E, F, D), param_dtype), axes=axes_out)
        self.act = Activation(act, E if per_expert_coeffs else None, rngs=rngs)
        self.per_expert_coeffs = per_expert_coeffs and self.act.coeffs is not None

    def _activate(self, h: Array, u: Array | None, experts: Array | None) -> Array:
        """The activation; with per-expert coefficients, ``experts`` (shaped like
        ``h.shape[:-1]``, or broadcastable to it) picks each row's set."""
        if not self.per_expert_coeffs:
            return self.act(h, u)
        weight = self.act.coeffs.weight[...][experts]
        bias = self.act.coeffs.bias[...][experts]
        return self.act(h, u, weight=weight, bias=bias)

    def __call__(self, x_BxLxD: Array) -> tuple[Array, dict[str, Array]]:
        B, L, D = x_BxLxD.shape
        x_BxLxD = x_BxLxD.astype(self.dtype)
        x_TxD = x_BxLxD.reshape(B * L, D)
        logits_TxE = jnp.einsum(
            "td,de->te", x_TxD.astype(jnp.float32), self.router[...].astype(jnp.float32)
        )
        gates_TxK, experts_TxK, probs_TxE = route(logits_TxE, self.top_k, self.renormalize)
        if self.dispatch == "dropless":
            y_TxD = self._dropless(x_TxD, gates_TxK, experts_TxK)
            dropped = jnp.zeros((), jnp.int32)
        else:
            K = self.top_k
            y_BxLxD, dropped = self._capacity(
                x_BxLxD, gates_TxK.reshape(B, L, K), experts_TxK.reshape(B, L, K)
            )
            y_TxD = y_BxLxD.reshape(B * L, D)
        stats = {
            "lb": load_balancing_loss(probs_TxE, experts_TxK),
            "z": router_z_loss(logits_TxE),
            "load": expert_load(experts_TxK, self.num_experts),
            "dropped": dropped,
        }
        return y_TxD.reshape(B, L, D), stats

    def _dropless(self, x_TxD: Array, gates_TxK: Array, experts_TxK: Array) -> Array:
        T, K = experts_TxK.shape
        dt = self.dtype
        expert_N = experts_TxK.reshape(-1)  # N = T * K assignments, token-major
        order_N = jnp.argsort(expert_N, stable=True)
        sorted_expert_N = expert_N[order_N]
        x_NxD = x_TxD[order_N // K]
        sizes_E = jnp.bincount(expert_N, length=self.num_experts).astype(jnp.int32)
        grouped = lambda a, w: jax.lax.ragged_dot(a, w[...].astype(dt), sizes_E)
        h_NxF = grouped(x_NxD, self.w_in)
        u_NxF = grouped(x_NxD, self.w_up) if self.gated else None
        h_NxF = self._activate(h_NxF, u_NxF, sorted_expert_N)
        out_NxD = grouped(h_NxF, self.w_out)
        out_TxKxD = out_NxD[jnp.argsort(order_N)].reshape(T, K, -1)
        return jnp.einsum("tkd,tk->td", out_TxKxD, gates_TxK.astype(dt))

    def _capacity(
        self, x_BxLxD: Array, gates_BxLxK: Array, experts_BxLxK: Array
    ) -> tuple[Array, Array]:
        B, L, K = experts_BxLxK.shape
        E, dt = self.num_experts, self.dtype
        C = capacity(L, E, K, self.capacity_factor)
        onehot_BxKxLxE = jax.nn.one_hot(experts_BxLxK.transpose(0, 2, 1), E, dtype=jnp.int32)
        # Queue position of each assignment at its expert: slot-major, then token order.
        queue_BxKLxE = jnp.cumsum(onehot_BxKxLxE.reshape(B, K * L, E), axis=1) - 1
        pos_BxKxL = jnp.sum(queue_BxKLxE.reshape(B, K, L, E) * onehot_BxKxLxE, axis=-1)
        keep_BxKxL = pos_BxKxL < C
        dropped = jnp.sum(~keep_BxKxL).astype(jnp.int32)
        slot_BxKxLxC = jax.nn.one_hot(jnp.where(keep_BxKxL, pos_BxKxL, C), C, dtype=dt)
        dispatch_BxLxExC = jnp.einsum("bkle,bklc->blec", onehot_BxKxLxE.astype(dt), slot_BxKxLxC)
        gates_BxKxL = gates_BxLxK.transpose(0, 2, 1).astype(dt)
        combine_BxLxExC = jnp.einsum(
            "bkle,bklc,bkl->blec", onehot_BxKxLxE.astype(dt), slot_BxKxLxC, gates_BxKxL
        )
        x_BxExCxD = jnp.einsum("blec,bld->becd", dispatch_BxLxExC, x_BxLxD)
        x_BxExCxD = self.shard(x_BxExCxD, ("batch", "expert", None, "act_embed"))
        proj = lambda w: jnp.einsum("becd,edf->becf", x_BxExCxD, w[...].astype(dt))
        h_BxExCxF = proj(self.w_in)
        u_BxExCxF = proj(self.w_up) if self.gated else None
        h_BxExCxF = self._activate(h_BxExCxF, u_BxExCxF, jnp.arange(E)[:, None])
        out_BxExCxD = jnp.einsum("becf,efd->becd", h_BxExCxF, self.w_out[...].astype(dt))
        return jnp.einsum("blec,becd->bld", combine_BxLxExC, out_BxExCxD), dropped
