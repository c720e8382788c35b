"""Causal grouped-query attention, by implementation.

- "xla": ``jax.nn.dot_product_attention``'s XLA path; it materialises the
  B x H x L x L scores (and keeps them for the backward). Runs everywhere.
- "cudnn": cuDNN's fused flash attention (GPU, 16-bit inputs). Packed documents
  reach it as the segment mask, which jax hands cuDNN as a B x 1 x L x L bias:
  one L x L plane per sequence, not per head, and never the scores.
- "splash": jax's Pallas TPU splash attention (flash attention with block
  sparsity: the causal mask skips the blocks above the diagonal), with the
  segment ids in the kernel. On CPU it runs in interpret mode (for tests).
- "auto": "splash" on TPU, "cudnn" on GPU for 16-bit inputs, "xla" otherwise.

The platform is ``polyjax.backend.platform()``: the compile target's while
``polyjax.aot`` compiles for a chip that is not here. Under a mesh the Pallas
kernel runs in ``shard_map`` over the batch and head axes (a custom call is not
partitioned by XLA). ``segment_ids_BxL`` None: one document per row (no mask
beyond the causal one).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from polyjax.backend import platform as current_platform

Array = jax.Array

IMPLS = ("auto", "xla", "cudnn", "splash")
SPLASH_BLOCK = 512
"""The splash kernel's query and key block (all passes), capped at the length."""
LANES = 128


def resolve(impl: str, dtype, length: int) -> str:
    """The implementation ``impl`` means for ``dtype`` inputs of ``length`` on the
    current platform (splash needs a multiple of 128: the TPU's lane width)."""
    if impl not in IMPLS:
        raise ValueError(f"attention must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl != "auto":
        return impl
    platform = current_platform()
    if platform == "tpu":
        return "splash" if length % LANES == 0 else "xla"
    if platform == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def causal_attention(
    q_BxLxHxK: Array,
    k_BxLxGxK: Array,
    v_BxLxGxK: Array,
    segment_ids_BxL: Array | None = None,
    impl: str = "auto",
    shard=None,
) -> Array:
    """Softmax(q k^T / sqrt(K) + causal and segment masks) v per head; query head h
    reads key/value head h // (H / G). ``shard``: the model's ``ActivationSharding``
    (its mesh and rules place the Pallas kernel), or None."""
    chosen = resolve(impl, q_BxLxHxK.dtype, q_BxLxHxK.shape[1])
    if chosen == "splash":
        return _splash_sharded(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, shard)
    mask = None
    if segment_ids_BxL is not None:
        mask = segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :]
    run = functools.partial(
        jax.nn.dot_product_attention, q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask=mask, is_causal=True
    )
    if impl == "auto" and chosen == "cudnn":
        try:  # cuDNN refuses some shapes (head sizes, lengths) at trace time
            return run(implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):
            return run(implementation="xla")
    return run(implementation=chosen)


# ----------------------------------------------------------------------------
# Splash attention (Pallas TPU).


def _splash_sharded(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, shard) -> Array:
    mesh = getattr(shard, "mesh", None)
    if mesh is None or mesh.size == 1:
        return splash(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
    batch, heads = shard.mesh_axes("batch") or None, shard.mesh_axes("heads") or None
    qkv = P(batch, None, heads, None)
    seg = None if segment_ids_BxL is None else P(batch, None)
    return jax.shard_map(
        splash, mesh=mesh, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv, check_vma=False
    )(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)


def splash(
    q_BxLxHxK: Array, k_BxLxGxK: Array, v_BxLxGxK: Array, segment_ids_BxL: Array | None = None
) -> Array:
    """Causal attention through the splash kernel (one device's shard): the kernel
    works per sequence on head-major tiles, so the heads move in front of the length;
    grouped heads run the multi-query kernel once per key/value head."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    B, L, H, K = q_BxLxHxK.shape
    G = k_BxLxGxK.shape[2]
    if L % LANES:
        raise ValueError(f"attention=splash: the length {L} must be a multiple of {LANES}")
    block = math.gcd(SPLASH_BLOCK, L)
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    make = sa.make_splash_mha if G == H else sa.make_splash_mqa
    kernel = make(
        sa.MultiHeadMask([sa.CausalMask((L, L))] * (H // G)),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=current_platform() == "cpu",
    )
    scale = 1.0 / math.sqrt(K)  # the kernel does not scale the logits
    q_BxGxRxLxK = (q_BxLxHxK * scale).astype(q_BxLxHxK.dtype)
    q_BxGxRxLxK = q_BxGxRxLxK.reshape(B, L, G, H // G, K).transpose(0, 2, 3, 1, 4)
    k_BxGxLxK, v_BxGxLxK = (t.transpose(0, 2, 1, 3) for t in (k_BxLxGxK, v_BxLxGxK))
    segments = None if segment_ids_BxL is None else sa.SegmentIds(segment_ids_BxL, segment_ids_BxL)

    def one(q_GxRxLxK, k_GxLxK, v_GxLxK, seg):
        if G == H:  # multi-head: the kernel takes H x L x K
            return kernel(q_GxRxLxK[:, 0], k_GxLxK, v_GxLxK, segment_ids=seg)[:, None]
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=seg))(
            q_GxRxLxK, k_GxLxK, v_GxLxK
        )

    seg_axes = None if segments is None else sa.SegmentIds(0, 0)
    o_BxGxRxLxK = jax.vmap(one, in_axes=(0, 0, 0, seg_axes))(
        q_BxGxRxLxK, k_BxGxLxK, v_BxGxLxK, segments
    )
    return o_BxGxRxLxK.transpose(0, 3, 1, 2, 4).reshape(B, L, H, K)
