"""The memory plan (polyjax.memory, launch.py --dry_run): parameter and optimizer
bytes per device against the arithmetic of shapes, dtypes and shards, and against
what XLA counts for the compiled step's arguments."""

import dataclasses

import jax
import pytest

from polyjax import memory
from polyjax.model import param_counts


def test_dense_fsdp_plan_matches_the_arithmetic(tiny):
    """Tiny dense model, FSDP over 8 devices, AdamW with mu in bf16: every parameter
    but the PolyNorm coefficients (order + 1 per layer) has an ``embed`` axis and is
    split 8 ways; the coefficients are replicated."""
    spec = tiny.spec(**{"mesh.data": 1, "mesh.fsdp": 8, "optim.mu_dtype": "bfloat16"})
    plan = memory.plan(spec, capacity=1e9)
    m = spec.model
    replicated = m.n_layers * (m.activation.order + 1)
    per_device = (param_counts(m)["total"] - replicated) // 8 + replicated  # elements
    assert plan.params == 4 * per_device  # float32 parameters
    counts = 2 * 4  # int32 step counts: Adam's and the schedule's
    assert plan.opt_state == (2 + 4) * per_device + counts  # mu bf16, nu fp32
    # four int32/fp32 arrays (the segment ids too with document boundaries)
    batch = 4 * 4 * spec.data.global_batch * spec.data.seq_len // 8
    assert plan.batch == batch
    # XLA's own count of the step's arguments: the state and the batch, nothing else.
    assert plan.arguments == plan.params + plan.opt_state + plan.batch + 3 * 4
    assert plan.aliased == plan.arguments - plan.batch  # the state is donated
    assert plan.temp > 0 and plan.total == plan.arguments + plan.temp + plan.outputs - plan.aliased
    assert plan.fits is True and dataclasses.replace(plan, capacity=plan.total - 1).fits is False


def test_moe_expert_mesh_plan_matches_the_arithmetic(tiny):
    """Tiny MoE on an expert mesh of 8: the parameters with an ``expert`` axis (the
    experts' weights and the router) are split 8 ways, the rest replicated."""
    spec = tiny.spec("moe", **{"mesh.data": 1, "mesh.expert": 8})
    plan = memory.plan(spec)
    counts, moe = param_counts(spec.model), spec.model.moe
    # active = total - expert + expert * top_k / num_experts
    expert = (counts["total"] - counts["active"]) * moe.num_experts
    expert //= moe.num_experts - moe.top_k
    per_device = counts["total"] - expert + expert // 8
    assert plan.params == 4 * per_device
    assert plan.opt_state == 8 * per_device + 2 * 4
    assert plan.arguments == plan.params + plan.opt_state + plan.batch + 3 * 4


def test_device_memory_sources():
    cpu = jax.devices()[0]
    assert memory.device_memory(cpu, 80e9) == (80e9, "given")
    assert memory.device_memory(cpu) == (None, "unknown")  # no limit, no table entry

    class FakeH100:
        device_kind = "NVIDIA H100 80GB HBM3"

        def memory_stats(self):
            return None

    assert memory.device_memory(FakeH100())[0] == 80e9

    class Reports(FakeH100):
        def memory_stats(self):
            return {"bytes_limit": 60_000}

    assert memory.device_memory(Reports()) == (60_000, "memory_stats()['bytes_limit']")


@pytest.mark.parametrize("kind,size", [("NVIDIA A100-SXM4-40GB", 40e9), ("TPU v5 lite", 16 << 30)])
def test_device_table_prefers_the_specific_entry(kind, size):
    class Device:
        device_kind = kind

        def memory_stats(self):
            return {}

    assert memory.device_memory(Device())[0] == size
