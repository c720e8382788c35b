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

Under a mesh of more than one device (``shard`` is a
``polyjax.sharding.ActivationSharding``, which has ``mesh`` and ``mesh_axes``) the dropless
dispatch runs in ``jax.shard_map``: inside the MoE every device takes its own slice
of the tokens (the batch split over every mesh axis, ``tensor`` included) and sorts
only those. Its experts are either all of them (the weights gathered, "gather") or
its share over the ``expert`` mesh axis, the assignments travelling to their
experts and back by ``all_to_all`` in buffers sized for the worst case, so nothing
is dropped ("all_to_all"). The router, the losses and the activation stay outside
the ``shard_map`` and are exact over the global batch. docs/moe.md has the details.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from polyjax.activations import ActivationConfig
from polyjax.layers import Activation, Shard, no_shard

Array = jax.Array

DISPATCHES = ("dropless", "capacity")
EXPERT_PARALLEL = ("auto", "gather", "all_to_all")
"""How the dropless dispatch reaches experts sharded over the ``expert`` mesh axis:
"gather" all-gathers the expert weights, "all_to_all" moves the assignments,
"auto" takes the one whose extra per-device bytes are fewer (``choose_expert_parallel``)."""


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


# ----------------------------------------------------------------------------
# Dropless dispatch, as pure functions of one device's tokens. Each is used in two
# halves around the activation: ``*_in`` builds the expert-sorted buffer of rows and
# runs the input projections, ``*_out`` the output projection and the way back.


def sort_assignments(experts_TxK: Array, num_experts: int) -> tuple[Array, Array, Array]:
    """The (token, slot) assignments, token-major (N = T * K), sorted by expert:
    (order_N, the sorted position -> assignment; sorted expert_N; sizes_E)."""
    expert_N = experts_TxK.reshape(-1)
    order_N = jnp.argsort(expert_N, stable=True)
    sizes_E = jnp.bincount(expert_N, length=num_experts).astype(jnp.int32)
    return order_N, expert_N[order_N], sizes_E


@jax.custom_vjp
def permute_rows(x_NxD: Array, order_N: Array) -> Array:
    """``x_NxD[order_N]`` for a permutation ``order_N``, written as scatters both ways:
    row j of the result is row order[j] of x, so row i of x goes to position inv[i]
    (inv = the inverse permutation), and the cotangent goes back by the scatter to
    ``order_N``. XLA:TPU's cost model charges a row gather of a bf16 (N, 2048) array
    about 14x its bytes (the rows read through the (16, 128) tiles that hold them) and
    a scatter of the same rows about their bytes; the 1B MoE layer moves four such
    permutations (its forward and the rematerialised one) per microbatch."""
    return _scatter_rows(x_NxD, inverse_permutation(order_N))


def inverse_permutation(order_N: Array) -> Array:
    """inv with inv[order[j]] = j."""
    N = order_N.shape[0]
    return jnp.zeros_like(order_N).at[order_N].set(jnp.arange(N, dtype=order_N.dtype))


def _scatter_rows(x_NxD: Array, dest_N: Array) -> Array:
    """y with y[dest[i]] = x[i] (``dest_N`` a permutation)."""
    return jnp.zeros_like(x_NxD).at[dest_N].set(x_NxD, unique_indices=True)


def _permute_rows_fwd(x_NxD, order_N):
    return permute_rows(x_NxD, order_N), order_N


def _permute_rows_bwd(order_N, ct_NxD):
    return _scatter_rows(ct_NxD, order_N), None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def grouped_matmul(x_RxD: Array, w_GxDxF: Array, sizes_G: Array) -> Array:
    """Rows grouped by expert (the first ``sizes_G[0]`` rows are group 0's, and so
    on) times their group's matrix; rows past the last group are padding, whose
    results are never read.

    ``jax.lax.ragged_dot``: a grouped GEMM on GPU and TPU; XLA:CPU has none, and jax
    lowers it there to one masked dense product per group (G copies of the rows).
    """
    return jax.lax.ragged_dot(x_RxD, w_GxDxF, sizes_G)


def grouped_in(x_RxD: Array, sizes_G: Array, w_in: Array, w_up: Array | None):
    """The input projection(s) of rows grouped by expert (``sizes_G`` rows each)."""
    h_RxF = grouped_matmul(x_RxD, w_in, sizes_G)
    u_RxF = None if w_up is None else grouped_matmul(x_RxD, w_up, sizes_G)
    return h_RxF, u_RxF


def local_in(x_TxD: Array, experts_TxK: Array, w_in: Array, w_up: Array | None):
    """Every expert on this device: rows = the sorted assignments. Returns (h, u,
    expert of each row)."""
    K = experts_TxK.shape[1]
    order_N, expert_N, sizes_E = sort_assignments(experts_TxK, w_in.shape[0])
    x_NxD = jnp.repeat(x_TxD, K, axis=0)  # token-major assignments
    h_NxF, u_NxF = grouped_in(permute_rows(x_NxD, order_N), sizes_E, w_in, w_up)
    return h_NxF, u_NxF, expert_N


def local_out(h_NxF: Array, experts_TxK: Array, gates_TxK: Array, w_out: Array) -> Array:
    """The output projection, back to token order, weighted by the gates."""
    T, K = experts_TxK.shape
    order_N, _, sizes_E = sort_assignments(experts_TxK, w_out.shape[0])
    out_NxD = grouped_matmul(h_NxF, w_out, sizes_E)
    out_TxKxD = permute_rows(out_NxD, inverse_permutation(order_N)).reshape(T, K, -1)
    return jnp.einsum("tkd,tk->td", out_TxKxD, gates_TxK.astype(out_TxKxD.dtype))


class Exchange(NamedTuple):
    """Where the assignments of one device go and where its received rows come from,
    for experts split in ``ep`` contiguous blocks of ``E_loc`` over an axis.

    Buffers are (ep, C, ...): block p of the send buffer goes to peer p, block s of
    the receive buffer came from peer s. C = T * min(K, E_loc) bounds the rows one
    device can send one peer (a token picks distinct experts), so none is dropped.
    """

    send_src: Array  # (ep, C): token of each send slot; T (out of range: zeros) if empty
    back: Array  # (N,): token-major assignment -> its row of the flat (ep * C) buffer
    recv_order: Array  # (ep * C,): received rows sorted by local expert, empty ones last
    recv_expert: Array  # (ep * C,): global expert of each sorted row (empty: the last)
    recv_sizes: Array  # (E_loc,): received rows per local expert


def plan_exchange(experts_TxK: Array, num_experts: int, axes: tuple[str, ...], ep: int):
    """The ``Exchange`` of this device (inside ``shard_map`` over ``axes``)."""
    T, K = experts_TxK.shape
    N, E_loc = T * K, num_experts // ep
    C = T * min(K, E_loc)
    order_N, expert_N, sizes_E = sort_assignments(experts_TxK, num_experts)
    send_P = sizes_E.reshape(ep, E_loc).sum(-1)
    start_P = jnp.cumsum(send_P) - send_P
    slot_C = jnp.arange(C)
    sorted_PxC = start_P[:, None] + slot_C
    src_PxC = jnp.where(slot_C < send_P[:, None], order_N[jnp.minimum(sorted_PxC, N - 1)] // K, T)
    peer_N = expert_N // E_loc  # sorted order
    row_N = peer_N * C + jnp.arange(N) - start_P[peer_N]
    back_N = jnp.zeros_like(row_N).at[order_N].set(row_N)  # token-major order
    me = jax.lax.axis_index(axes)
    sizes_SxE = jax.lax.all_gather(sizes_E, axes)  # every sender's counts
    mine_SxL = jax.lax.dynamic_slice_in_dim(sizes_SxE, me * E_loc, E_loc, axis=1)
    ends_SxL = jnp.cumsum(mine_SxL, axis=1)
    local_SxC = jax.vmap(lambda ends: jnp.searchsorted(ends, slot_C, side="right"))(ends_SxL)
    local_R = local_SxC.reshape(-1)  # E_loc where the slot is empty
    order_R = jnp.argsort(local_R, stable=True)
    expert_R = me * E_loc + jnp.minimum(local_R[order_R], E_loc - 1)
    return Exchange(src_PxC, back_N, order_R, expert_R, mine_SxL.sum(0))


def all_to_all_in(x_TxD, experts_TxK, w_in, w_up, *, num_experts, axes, ep):
    """Send each assignment to the device holding its expert (``w_*`` are this
    device's E_loc experts) and project it there. Returns (h, u, expert of each row)."""
    ex = plan_exchange(experts_TxK, num_experts, axes, ep)
    send_PxCxD = jnp.take(x_TxD, ex.send_src, axis=0, mode="fill", fill_value=0)
    recv_SxCxD = jax.lax.all_to_all(send_PxCxD, axes, 0, 0)
    x_RxD = permute_rows(recv_SxCxD.reshape(-1, x_TxD.shape[-1]), ex.recv_order)
    h_RxF, u_RxF = grouped_in(x_RxD, ex.recv_sizes, w_in, w_up)
    return h_RxF, u_RxF, ex.recv_expert


def all_to_all_out(h_RxF, experts_TxK, gates_TxK, w_out, *, num_experts, axes, ep):
    """The output projection on the expert's device, the way back, the gates."""
    T, K = experts_TxK.shape
    ex = plan_exchange(experts_TxK, num_experts, axes, ep)
    out_RxD = grouped_matmul(h_RxF, w_out, ex.recv_sizes)
    back_RxD = permute_rows(out_RxD, inverse_permutation(ex.recv_order))
    back_SxCxD = back_RxD.reshape(ep, -1, out_RxD.shape[-1])
    home_PxCxD = jax.lax.all_to_all(back_SxCxD, axes, 0, 0)
    out_TxKxD = home_PxCxD.reshape(-1, out_RxD.shape[-1])[ex.back].reshape(T, K, -1)
    return jnp.einsum("tkd,tk->td", out_TxKxD, gates_TxK.astype(out_TxKxD.dtype))


def choose_expert_parallel(
    tokens: int, num_experts: int, top_k: int, d_model: int, d_expert: int, n_mats: int, ep: int
) -> str:
    """The expert-parallel path "auto" takes: "all_to_all" when its worst-case
    buffers beyond the local assignments ((ep * C - tokens * K) rows of d_model +
    d_expert, C = tokens * min(K, E / ep)) are smaller than the expert weights that
    "gather" brings from the other devices ((E - E / ep) * d_model * d_expert *
    n_mats), else "gather"; ``tokens`` is per device."""
    E_loc = num_experts // ep
    extra_rows = ep * tokens * min(top_k, E_loc) - tokens * top_k
    gathered = (num_experts - E_loc) * d_model * d_expert * n_mats
    return "all_to_all" if extra_rows * (d_model + d_expert) < gathered else "gather"


class MoE(nnx.Module):
    """The MoE FFN of one layer: a router and ``num_experts`` FFNs of width ``d_expert``.

    Returns the output and per-layer statistics: ``lb`` and ``z`` (the unweighted
    load-balancing and z losses), ``load`` (per-expert assignment shares) and
    ``dropped`` (assignments the capacity dispatch dropped; 0 when dropless).

    ``expert_parallel`` (one of ``EXPERT_PARALLEL``) matters only for the dropless
    dispatch on a mesh whose ``expert`` axis has more than one device.
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
        expert_parallel: str = "auto",
        rngs: nnx.Rngs,
    ):
        if expert_parallel not in EXPERT_PARALLEL:
            raise ValueError(
                f"expert_parallel={expert_parallel!r}: must be one of {', '.join(EXPERT_PARALLEL)}"
            )
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.dispatch, self.capacity_factor = dispatch, capacity_factor
        self.dtype, self.shard, self.expert_parallel = dtype, shard, expert_parallel
        self.gated = act.spec.gated
        E, D, F = num_experts, d_model, d_expert
        self.router = nnx.Param(init(rngs.params(), (D, E), param_dtype), axes=("embed", None))
        axes_in, axes_out = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
        self.w_in = nnx.Param(init(rngs.params(), (E, D, F), param_dtype), axes=axes_in)
        if self.gated:
            self.w_up = nnx.Param(init(rngs.params(), (E, D, F), param_dtype), axes=axes_in)
        self.w_out = nnx.Param(init(rngs.params(), (E, F, D), param_dtype), axes=axes_out)
        self.act = Activation(act, E if per_expert_coeffs else None, shard=shard, rngs=rngs)
        self.per_expert_coeffs = per_expert_coeffs and self.act.coeffs is not None

    def _activate(self, h: Array, u: Array | None, experts: Array | None, spec=None) -> Array:
        """The activation; with per-expert coefficients, ``experts`` (shaped like
        ``h.shape[:-1]``, or broadcastable to it) picks each row's set. ``spec``: how
        ``h`` is split over the mesh (for the Pallas kernels)."""
        if not self.per_expert_coeffs:
            return self.act(h, u, spec=spec)
        weight = self.act.coeffs.weight[...][experts]
        bias = self.act.coeffs.bias[...][experts]
        return self.act(h, u, weight=weight, bias=bias, spec=spec)

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

    def _weights(self) -> tuple[Array, Array | None, Array]:
        dt = self.dtype
        w_up = self.w_up[...].astype(dt) if self.gated else None
        return self.w_in[...].astype(dt), w_up, self.w_out[...].astype(dt)

    def _dropless(self, x_TxD: Array, gates_TxK: Array, experts_TxK: Array) -> Array:
        w_in, w_up, w_out = self._weights()
        mesh = getattr(self.shard, "mesh", None)
        if mesh is None or mesh.size == 1:
            h, u, expert_R = local_in(x_TxD, experts_TxK, w_in, w_up)
            return local_out(self._activate(h, u, expert_R), experts_TxK, gates_TxK, w_out)
        return self._dropless_sharded(mesh, x_TxD, gates_TxK, experts_TxK, w_in, w_up, w_out)

    def _dropless_sharded(self, mesh, x_TxD, gates_TxK, experts_TxK, w_in, w_up, w_out):
        """Tokens split over every mesh axis (batch axes first, so no data moves);
        experts local ("gather") or split over the expert axes ("all_to_all")."""
        batch_axes = self.shard.mesh_axes("batch")
        token_axes = batch_axes + tuple(a for a in mesh.axis_names if a not in batch_axes)
        expert_axes = self.shard.mesh_axes("expert")
        ep = math.prod(mesh.shape[a] for a in expert_axes)
        T, K = experts_TxK.shape
        pad = -T % mesh.size
        if pad:  # padded tokens pick experts 0..K-1 (distinct) with gate 0
            x_TxD = jnp.pad(x_TxD, ((0, pad), (0, 0)))
            gates_TxK = jnp.pad(gates_TxK, ((0, pad), (0, 0)))
            filler = jnp.broadcast_to(jnp.arange(K, dtype=experts_TxK.dtype), (pad, K))
            experts_TxK = jnp.concatenate([experts_TxK, filler])
        mode = self.expert_parallel
        if mode == "auto":
            n_mats = 3 if self.gated else 2
            D, F = w_in.shape[1:]
            tokens = (T + pad) // mesh.size
            mode = choose_expert_parallel(tokens, self.num_experts, K, D, F, n_mats, ep)
        if ep == 1 or mode == "gather":
            stage_in, stage_out, w_spec = local_in, local_out, P()
        else:
            kw = dict(num_experts=self.num_experts, axes=expert_axes, ep=ep)
            stage_in = functools.partial(all_to_all_in, **kw)
            stage_out = functools.partial(all_to_all_out, **kw)
            w_spec = P(expert_axes)
        rows, up_spec = P(token_axes), (None if w_up is None else w_spec)
        smap = functools.partial(jax.shard_map, mesh=mesh)
        h, u, expert_R = smap(
            stage_in,
            in_specs=(rows, rows, w_spec, up_spec),
            out_specs=(rows, None if w_up is None else rows, rows),
        )(x_TxD, experts_TxK, w_in, w_up)
        h = self._activate(h, u, expert_R, rows)
        y_TxD = smap(stage_out, in_specs=(rows, rows, rows, w_spec), out_specs=rows)(
            h, experts_TxK, gates_TxK, w_out
        )
        return y_TxD[:T] if pad else y_TxD

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
        # Experts over the expert axis, so the batch only over the other batch axes:
        # the partitioner moves the buffers by all-to-all.
        expert_major = ("batch_no_expert", "expert", None, "act_embed")
        x_BxExCxD = self.shard(x_BxExCxD, expert_major)
        proj = lambda w: jnp.einsum("becd,edf->becf", x_BxExCxD, w[...].astype(dt))
        h_BxExCxF = proj(self.w_in)
        u_BxExCxF = proj(self.w_up) if self.gated else None
        spec = getattr(self.shard, "spec", lambda axes: None)(
            ("batch_no_expert", "expert", None, "mlp")
        )
        h_BxExCxF = self._activate(h_BxExCxF, u_BxExCxF, jnp.arange(E)[:, None], spec)
        out_BxExCxD = jnp.einsum("becf,efd->becd", h_BxExCxF, self.w_out[...].astype(dt))
        out_BxExCxD = self.shard(out_BxExCxD, expert_major)
        return jnp.einsum("blec,becd->bld", combine_BxLxExC, out_BxExCxD), dropped
