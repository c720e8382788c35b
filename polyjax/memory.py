"""The per-device memory plan of a run: the train step compiled for the run's mesh
from abstract inputs (nothing allocated), with its parameter, optimizer-state and
batch bytes counted from shapes, dtypes and shardings, and XLA's own account
(``compile().memory_analysis()``) of the arguments, temporaries and outputs.

    plan = memory.plan(spec)                 # compiles the train step; seconds to minutes
    print(plan.describe())

Per device, a leaf of the train state holds ``prod(shard shape) x itemsize`` bytes:
its whole size divided by the mesh axes it is sharded over, or all of it when it is
replicated. The device's memory comes from ``device.memory_stats()["bytes_limit"]``
(what XLA's allocator may use), else from ``polyjax.chips`` by device kind, else
from the caller (``capacity``); without any, whether it fits is unknown.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from polyjax import chips, train
from polyjax import sharding as shd
from polyjax.config import Spec

GB = 1e9
UNITS = (("GB", 1e9), ("MB", 1e6), ("KB", 1e3))


def device_memory(
    device: jax.Device | None = None, capacity: float | None = None
) -> tuple[float | None, str]:
    """(bytes, where the figure comes from) of one device's memory: ``capacity``
    when given, else the runtime's allocator limit, else ``polyjax.chips`` by the
    device kind, else (None, "unknown")."""
    if capacity:
        return float(capacity), "given"
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except (NotImplementedError, RuntimeError, AttributeError):
        stats = None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"]), "memory_stats()['bytes_limit']"
    chip = chips.by_kind(device.device_kind)
    if chip is not None:
        return chip.hbm, f"table: {chip.key}"
    return None, "unknown"


def shard_bytes(x: Any, sharding: jax.sharding.Sharding) -> int:
    """Bytes of one device's shard of ``x`` (an array or ShapeDtypeStruct)."""
    return math.prod(sharding.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize


def tree_bytes(tree: Any, shardings: Any) -> int:
    """Per-device bytes of the leaves of ``tree`` under the matching ``shardings``."""
    leaves = jax.tree.leaves(tree)
    sharding_leaves = jax.tree.leaves(
        shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)
    )
    return sum(shard_bytes(x, s) for x, s in zip(leaves, sharding_leaves, strict=True))


def abstract_batch(spec: Spec, sharding: jax.sharding.Sharding) -> dict[str, Any]:
    """The shapes of one global batch (the pipeline's keys), sharded by ``sharding``."""
    shape = (spec.data.global_batch, spec.data.seq_len)
    dtypes = dict(inputs=jnp.int32, targets=jnp.int32, positions=jnp.int32, weights=jnp.float32)
    if spec.data.document_boundaries:  # else all one, and the step does not read them
        dtypes["segment_ids"] = jnp.int32
    return {k: jax.ShapeDtypeStruct(shape, d, sharding=sharding) for k, d in dtypes.items()}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of the compiled train step. ``params``, ``opt_state``,
    ``other_state`` (step, counters, the model's RNG state) and ``batch`` are
    counted from shapes and shardings; ``arguments``, ``temp``, ``outputs`` and
    ``aliased`` are XLA's (``memory_analysis()``). The state is donated, so the
    step's outputs reuse its buffers (``aliased``)."""

    params: int
    opt_state: int
    other_state: int
    batch: int
    arguments: int
    temp: int
    outputs: int
    aliased: int
    code: int
    capacity: float | None
    capacity_source: str
    devices: str
    mesh: Mapping[str, int]
    tokens_per_device: float
    flops: float | None = None  # XLA's cost_analysis, per device (a scanned layer once)

    @property
    def total(self) -> int:
        """The step's peak as XLA plans it: its arguments, temporaries and the
        outputs that do not reuse a donated argument."""
        return self.arguments + self.temp + self.outputs - self.aliased

    @property
    def counted(self) -> int:
        """The arguments as counted from shapes (should equal ``arguments``)."""
        return self.params + self.opt_state + self.other_state + self.batch

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.total <= self.capacity

    def summary(self) -> str:
        """One line: the total against the device's memory, and the temporaries."""
        of = "" if self.capacity is None else f" of {self.capacity / GB:,.1f} GB"
        return f"{self.total / GB:,.1f} GB{of} per device, {self.temp / GB:,.1f} GB of temporaries"

    def describe(self) -> str:
        unit, scale = next((u, s) for u, s in UNITS if self.total >= s or s == 1e3)
        size = lambda b: f"{b / scale:12,.3f} {unit}"
        rows = [
            f"memory per device (the train step compiled for {self.devices}, mesh "
            f"{dict(self.mesh)}; {self.tokens_per_device:,.0f} tokens per device per "
            "microbatch):",
            f"  parameters       {size(self.params)}",
            f"  optimizer state  {size(self.opt_state)}",
            f"  batch, counters  {size(self.batch + self.other_state)}",
            f"  temporaries      {size(self.temp)}   (XLA memory_analysis)",
        ]
        if self.outputs > self.aliased:
            rows.append(f"  outputs          {size(self.outputs - self.aliased)}   (not donated)")
        rows.append(f"  total            {size(self.total)}")
        if self.counted != self.arguments:
            rows.append(
                f"  (XLA counts {self.arguments:,} argument bytes, the shapes {self.counted:,})"
            )
        if self.capacity is None:
            rows.append("  device memory    unknown: fits? unknown")
        else:
            verdict = "fits" if self.fits else "does NOT fit"
            rows.append(
                f"  device memory    {size(self.capacity)}   ({self.capacity_source}): "
                f"{verdict}, {100 * self.total / self.capacity:.0f}% used"
            )
        return "\n".join(rows)


def compile_train_step(
    spec: Spec, options: Mapping[str, Any] | None = None
) -> tuple[Any, train.Steps, train.TrainState, dict]:
    """(the compiled train step, the steps, the abstract state, the abstract batch)
    of ``spec`` on its mesh, built from an abstract model: nothing is allocated.
    ``options``: XLA compiler options (flag -> value) for this compile."""
    model = nnx.eval_shape(lambda: shd.create_model(spec.model, spec.mesh, spec.rules, 0))
    steps = train.make_steps(spec, model)
    state = jax.eval_shape(steps.init, *nnx.split(model, nnx.Param, ...)[1:])
    batch = abstract_batch(spec, steps.batch_sharding)
    compiled = steps.train.lower(state, batch).compile(compiler_options=options)
    return compiled, steps, state, batch


def plan(spec: Spec, capacity: float | None = None) -> MemoryPlan:
    """The memory plan of ``spec``'s train step (compiles it; nothing is allocated).
    ``capacity``: the device's memory in bytes, overriding what the runtime says."""
    return plan_of(spec, *compile_train_step(spec), capacity)


def plan_of(
    spec: Spec,
    compiled,
    steps: train.Steps,
    state: train.TrainState,
    batch: dict,
    capacity: float | None = None,
    source: str = "given",
) -> MemoryPlan:
    """The memory plan of a compiled train step (``compile_train_step``'s results)."""
    shardings = steps.state_shardings
    analysis = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    if analysis is None:
        raise RuntimeError(f"XLA gives no memory analysis on {jax.default_backend()}")
    other = [(state.step, shardings.step), (state.nonfinite, shardings.nonfinite)]
    other += [(state.bad_step, shardings.bad_step), (state.rest, shardings.rest)]
    batch_sharding = {k: steps.batch_sharding for k in batch}
    device = spec.mesh.devices.flat[0]
    size, where = (capacity, source) if capacity else device_memory(device)
    data_parallel = math.prod(spec.mesh.shape[a] for a in steps.batch_sharding.spec[0])
    tokens = spec.data.global_batch * spec.data.seq_len / data_parallel / spec.optim.grad_accum
    return MemoryPlan(
        params=tree_bytes(state.params, shardings.params),
        opt_state=tree_bytes(state.opt_state, shardings.opt_state),
        other_state=sum(tree_bytes(x, s) for x, s in other),
        batch=tree_bytes(batch, batch_sharding),
        arguments=int(analysis.argument_size_in_bytes),
        temp=int(analysis.temp_size_in_bytes),
        outputs=int(analysis.output_size_in_bytes),
        aliased=int(analysis.alias_size_in_bytes),
        code=int(analysis.generated_code_size_in_bytes),
        capacity=size,
        capacity_source=where,
        devices=f"{spec.mesh.devices.size} x {device.device_kind}",
        mesh=dict(spec.mesh.shape),
        tokens_per_device=tokens,
        flops=cost.get("flops"),
    )


def changes_to_fit(spec: Spec) -> Iterator[dict[str, Any]]:
    """Config changes (field -> value) that lower the step's memory, cheapest first:
    the data axis folded into fsdp (parameters and optimizer state sharded, no cost),
    then more microbatches (less activation memory, no extra FLOPs), then ``remat=full``
    (about a third more FLOPs) with more microbatches."""
    shape, opt = dict(spec.mesh.shape), spec.optim
    base: dict[str, Any] = {}
    if shape["data"] > 1:
        base = {"mesh.data": 1, "mesh.fsdp": shape["data"] * shape["fsdp"]}
        yield base
    data_parallel = shape["data"] * shape["fsdp"] * shape["expert"]
    accum = lambda k: spec.data.global_batch % (data_parallel * k) == 0
    for remat in dict.fromkeys((spec.model.remat, "full")):
        start = {**base, "model.remat": remat} if remat != spec.model.remat else base
        if start is not base:
            yield start
        for k in (2, 4, 8, 16):
            if opt.grad_accum * k <= 16 and accum(opt.grad_accum * k):
                yield {**start, "optim.grad_accum": opt.grad_accum * k}


def with_changes(config: Mapping[str, Any], changes: Mapping[str, Any]) -> dict:
    """A copy of the plain ``config`` with ``changes`` (dotted field -> value) set."""
    out = json.loads(json.dumps(config))
    for field, value in changes.items():
        *path, last = field.split(".")
        node = out
        for part in path:
            node = node[part]
        node[last] = value
    return out


def bench_spec(
    model: Mapping[str, Any],
    *,
    batch: int,
    seq: int,
    mesh: Mapping[str, int] | None = None,
    grad_accum: int = 1,
    name: str = "bench",
) -> Spec:
    """A run of ``model`` (a ``ModelConfig`` dict, e.g. from ``polyjax.model.preset``)
    on a global batch of ``batch`` x ``seq`` tokens, for tools that feed their own
    batches (benchmarks, memory plans): its data section names no real data and is
    never read. Default mesh: data-parallel over every device."""
    config = {
        "name": name,
        "model": dict(model),
        "data": {"source": "tokens:unused", "tokenizer": "unused", "seq_len": seq},
        "optim": {"grad_accum": grad_accum},
        "train": {},
        "mesh": dict(mesh or {"data": -1}),
    }
    config["data"]["global_batch"] = batch
    return Spec.from_config(config)


def largest_batch(
    spec_for: Callable[[int], Spec], capacity: float, candidates: Sequence[int]
) -> tuple[int, MemoryPlan] | tuple[None, None]:
    """The largest of ``candidates`` (global batch sizes, ascending) whose train step
    ``spec_for(batch)`` fits ``capacity`` bytes per device, with its plan, found by
    bisection (memory grows with the batch); (None, None) if even the first does
    not fit. Each probe compiles the step."""
    best: tuple[int, MemoryPlan] | tuple[None, None] = (None, None)
    lo, hi = 0, len(candidates) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        p = plan(spec_for(candidates[mid]), capacity)
        if p.fits:
            best, lo = (candidates[mid], p), mid + 1
        else:
            hi = mid - 1
    return best
