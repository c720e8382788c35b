"""Device mesh, logical-axis rules, sharded model creation, the shardings of the
train state and of the batches, and input validation.

Every parameter names its dimensions with logical axes (``embed``, ``mlp``,
``heads``, ``kv``, ``vocab``, ``expert``, ``layers``); the main activations use
``batch``, ``length``, ``act_embed`` besides those. A rules table maps each
logical name to mesh axes (or None: replicated). The mesh axes are
``MESH_AXES``; a mesh config gives their sizes, -1 meaning "the rest".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from polyjax.model import ModelConfig, Transformer

Array = jax.Array
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")

DEFAULT_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("batch_no_expert", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("layers", None),
)
"""Logical axis -> mesh axes: FSDP shards the model width, tensor parallelism the
FFN width, heads and vocabulary, expert parallelism the experts; the batch is
split over every mesh axis but ``tensor``, and in tensors that also have an expert
dimension (the MoE capacity buffers) over those but ``expert`` too."""


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``MESH_AXES`` (missing axes get size 1, one size may be -1 for
    the rest of the devices) with automatic sharding propagation."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axis {', '.join(unknown)}; valid: {', '.join(MESH_AXES)}")
    sizes = {a: shape.get(a, 1) for a in MESH_AXES}
    for a, s in sizes.items():
        if not isinstance(s, int) or (s < 1 and s != -1):
            raise ValueError(f"mesh.{a}={s!r}: must be an integer >= 1, or -1 for the rest")
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {', '.join(rest)}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if n % fixed:
            raise ValueError(
                f"mesh {dict(shape)}: the fixed axes need a multiple of {fixed} devices, "
                f"but there are {n}"
            )
        sizes[rest[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        raise ValueError(
            f"mesh {dict(shape)} has {math.prod(sizes.values())} devices but there are {n}; "
            f"make the product of the sizes {n} or set one axis to -1"
        )
    grid = [sizes[a] for a in MESH_AXES]
    types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(grid, MESH_AXES, axis_types=types, devices=devices)
    except NotImplementedError:  # a TPU torus whose axes the sizes cannot follow whole
        from jax.experimental import mesh_utils

        grid_devices = mesh_utils.create_device_mesh(grid, devices, allow_split_physical_axes=True)
        return Mesh(grid_devices, MESH_AXES, axis_types=types)


def _rules_dict(rules: Rules) -> dict[str, tuple[str, ...]]:
    out = {}
    for name, target in rules:
        if target is None:
            out[name] = ()
        else:
            out[name] = (target,) if isinstance(target, str) else tuple(target)
        bad = [a for a in out[name] if a not in MESH_AXES]
        if bad:
            raise ValueError(
                f"rules: {name!r} maps to unknown mesh axis {bad[0]!r}; valid: {MESH_AXES}"
            )
    return out


def logical_to_spec(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions have logical names ``axes``."""
    table = _rules_dict(rules)
    spec, used = [], set()
    for name in axes:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; rules cover {sorted(table)}")
        mesh_axes = table[name]
        clash = used.intersection(mesh_axes)
        if clash:
            raise ValueError(f"logical axes {tuple(axes)} use mesh axis {clash.pop()!r} twice")
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
    """The model's ``shard`` hook: constrains an activation to its logical axes."""

    mesh: Mesh
    rules: Rules

    def __call__(self, x: Array, axes: tuple[str | None, ...]) -> Array:
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(axes)))

    def spec(self, axes: tuple[str | None, ...]) -> PartitionSpec:
        """The mesh axes of an activation with logical ``axes``."""
        return logical_to_spec(axes, self.rules)

    def mesh_axes(self, logical: str) -> tuple[str, ...]:
        """The mesh axes the logical axis ``logical`` is split over (for ``shard_map``)."""
        return _rules_dict(self.rules).get(logical, ())


def model_shardings(model_or_state, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """The model's state (``nnx.state(model)``, abstract or not) with each variable's
    value replaced by its NamedSharding (replicated where it has no ``axes``)."""
    state = model_or_state
    if isinstance(state, nnx.Module):
        state = nnx.state(state)

    def one(var):
        axes = var.get_metadata().get("axes")
        spec = PartitionSpec() if axes is None else logical_to_spec(axes, rules)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_model(
    cfg: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES, seed: int = 0
) -> Transformer:
    """The model with every parameter created directly in its sharding (a jitted
    init with out_shardings), never whole on one device."""
    shard = ActivationSharding(mesh, rules)
    build = lambda: Transformer(cfg, rngs=nnx.Rngs(seed), shard=shard)
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    shardings = model_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """For [B, L] inputs: B split over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def put_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, Array]:
    """This process's rows of a batch (numpy) -> global arrays sharded by ``sharding``."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


def microbatches(batch: Mapping[str, Array], k: int, sharding: NamedSharding) -> dict[str, Array]:
    """[B, ...] -> [k, B/k, ...], microbatch j = rows j, j+k, ... so that every
    device holds its share of every microbatch (``sharding``: the batch's)."""

    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, *sharding.spec)
        return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, spec))

    return jax.tree.map(split, dict(batch))


def opt_shardings(opt_state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """The optimizer state's shardings (``opt_state`` may be abstract): the moments
    (NNX states mirroring the parameters) as the parameters, the rest (counts)
    replicated."""
    return jax.tree.map(
        lambda x: (
            model_shardings(x, mesh, rules)
            if isinstance(x, nnx.State)
            else NamedSharding(mesh, PartitionSpec())
        ),
        opt_state,
        is_leaf=lambda x: isinstance(x, nnx.State),
    )


def _axis_size(mesh: Mesh, mesh_axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[a] for a in mesh_axes)


def validate(cfg: ModelConfig, mesh: Mesh, global_batch: int, rules: Rules = DEFAULT_RULES):
    """Raise a ValueError naming the field when the mesh cannot shard this model or
    batch: a sharded dimension the mesh axes do not divide (``make_mesh`` has checked
    the device count)."""
    table = _rules_dict(rules)
    dp_axes = table.get("batch", ())
    dp = _axis_size(mesh, dp_axes)
    if global_batch % dp:
        raise ValueError(
            f"global_batch={global_batch} is not divisible by the data-parallel size {dp} "
            f"(mesh axes {dp_axes}: {[mesh.shape[a] for a in dp_axes]})"
        )
    fields = [
        ("d_model", cfg.d_model, "embed"),
        ("n_heads", cfg.n_heads, "heads"),
        ("n_kv_heads", cfg.kv_heads, "heads"),
        ("vocab_size", cfg.vocab_size, "vocab"),
    ]
    if cfg.moe is None:
        fields.append(("d_ff", cfg.d_ff, "mlp"))
    else:
        fields += [
            ("moe.d_expert", cfg.moe.d_expert, "mlp"),
            ("moe.num_experts", cfg.moe.num_experts, "expert"),
        ]
    for field, value, logical in fields:
        mesh_axes = table.get(logical, ())
        size = _axis_size(mesh, mesh_axes)
        if value % size:
            raise ValueError(
                f"{field}={value} is not divisible by {size}, the size of mesh axes "
                f"{mesh_axes} that logical axis {logical!r} is sharded over; change {field}, "
                f"the mesh or the rules"
            )
    # Backstop for every parameter (custom rules may shard other names).
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        spec = logical_to_spec(var.get_metadata()["axes"], rules)
        for dim, part in zip(var.get_value().shape, spec, strict=False):
            parts = () if part is None else (part,) if isinstance(part, str) else part
            if dim % _axis_size(mesh, parts):
                raise ValueError(
                    f"parameter {'/'.join(map(str, path))}: dimension {dim} is not "
                    f"divisible by mesh axes {parts} of size {_axis_size(mesh, parts)}"
                )


def describe(cfg: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> str:
    """A table of the mesh and of each parameter's shape, logical axes and sharding."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    lines = [f"mesh {dict(mesh.shape)} over {mesh.devices.size} device(s)"]
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        axes = var.get_metadata()["axes"]
        spec = logical_to_spec(axes, rules)
        name = "/".join(map(str, path))
        lines.append(f"  {name:40s} {tuple(var.get_value().shape)!s:24s} {axes} -> {spec}")
    return "\n".join(lines)
