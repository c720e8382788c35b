"""The train step compiled for an accelerator that is not here: the target's own
compiler (XLA:TPU through libtpu, XLA:GPU through the CUDA plugin) builds the
run's real step for a chip and topology from abstract devices, on any machine.

    target = aot.get_target("v5p-64")    # or "v5p:2x4x4", "v6e-8", "h100x8", "h200x16"
    report = aot.compile_report(config, target)
    print(report.describe())

What comes back, per device: XLA's memory analysis (or its compile-time HBM
refusal), FLOPs and bytes accessed, the compiler's estimated step time (XLA:TPU's
cost model; XLA:GPU has none, so a roofline bound stands in, labelled so), the
tokens/s and MFU those imply, and the collectives of the compiled program. All
of it the compiler's estimates, not measurements. docs/aot.md has the table.

Naming: ``v5p-N`` counts TensorCores (two per chip, Google's and MaxText's
habit: v5p-8 is 4 chips), ``v5e-N`` and ``v6e-N`` count chips; ``v5p:2x2x2``
gives the topology itself; ``h100xN`` / ``h200xN`` are N GPUs, 8 per host.
Needs ``pip install -e ".[aot]"`` (libtpu and the CUDA plugin).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from polyjax import attention, backend, chips, memory
from polyjax.config import Spec
from polyjax.model import DTYPES, flops_per_token

TPU_FAMILIES = {"v5p": ("TPU v5p", 3, 2), "v5e": ("TPU v5e", 2, 1), "v6e": ("TPU v6e", 2, 1)}
"""TPU family -> (chip key in ``polyjax.chips``, topology dimensions, TensorCores
per unit of the ``-N`` name)."""

GPUS = {  # published figures of each GPU (the CUDA plugin's target config is built from them)
    "h100": dict(kind="NVIDIA H100 80GB HBM3", sms=132, clock_ghz=1.98, l2=50 << 20, cc=(9, 0)),
    "h200": dict(kind="NVIDIA H200", sms=132, clock_ghz=1.98, l2=50 << 20, cc=(9, 0)),
}
GPUS_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class Target:
    """A chip and topology to compile for."""

    name: str
    platform: str  # "tpu" | "gpu"
    chip: chips.Chip
    topology: str  # as given to get_topology_desc
    devices: tuple  # the topology's abstract devices

    @property
    def hosts(self) -> int:
        return len({d.process_index for d in self.devices})

    def __str__(self) -> str:
        kind = self.devices[0].device_kind
        hosts = f"{self.hosts} host" + ("s" if self.hosts > 1 else "")
        return f"{self.name} ({len(self.devices)} x {kind}, topology {self.topology}, {hosts})"


def _grid(units: int, ndim: int) -> list[int]:
    """The topology of ``units`` chips: start from one chip (2x2x1 for a v5p host),
    double the smallest dimension (the last one on ties) until the count is reached."""
    dims = [2, 2, 1] if ndim == 3 else [1, 1]
    while math.prod(dims) < units:
        smallest = min(dims)
        i = max(j for j, d in enumerate(dims) if d == smallest)
        dims[i] *= 2
    return dims


def parse(name: str) -> tuple[str, str, str]:
    """(platform, chip key in ``polyjax.chips`` or a GPU of ``GPUS``, topology) of a
    target name; ValueError naming the valid forms."""
    valid = (
        "valid targets: v5p-N (N TensorCores, 2 per chip), v5e-N or v6e-N (N chips), "
        "a TPU topology like v5p:2x2x2, or h100xN / h200xN (N GPUs, 8 per host)"
    )
    m = re.fullmatch(r"(v5p|v5e|v6e)-(\d+)", name)
    if m:
        family, n = m.group(1), int(m.group(2))
        key, ndim, cores = TPU_FAMILIES[family]
        units = n // cores
        minimum = 4 if ndim == 3 else 1
        if n % cores or units < minimum or units & (units - 1):
            raise ValueError(f"--target={name}: {family} sizes are powers of two; {valid}")
        return "tpu", key, f"{family}:" + "x".join(map(str, _grid(units, ndim)))
    m = re.fullmatch(r"(v5p|v5e|v6e):(\d+(?:x\d+)+)", name)
    if m:
        key, ndim, _ = TPU_FAMILIES[m.group(1)]
        if len(m.group(2).split("x")) != ndim:
            raise ValueError(f"--target={name}: {m.group(1)} topologies have {ndim} dims")
        return "tpu", key, name
    m = re.fullmatch(r"(h100|h200)x(\d+)", name.lower())
    if m:
        n = int(m.group(2))
        if n < 1 or (n > GPUS_PER_HOST and n % GPUS_PER_HOST):
            raise ValueError(f"--target={name}: more than 8 GPUs come in hosts of 8; {valid}")
        hosts, per_host = max(1, n // GPUS_PER_HOST), min(n, GPUS_PER_HOST)
        return "gpu", m.group(1), f"1x{hosts}x{per_host}"
    raise ValueError(f"--target={name}: unknown; {valid}")


def prepare() -> None:
    """Before jax starts its backends: compile on the CPU (no accelerator is needed,
    and the CUDA plugin refuses to start without a GPU otherwise), keep libtpu from
    asking a cloud metadata server which TPU this is, and let several processes load
    libtpu at once (it takes a machine-wide lock file otherwise)."""
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@contextlib.contextmanager
def _environ(values: Mapping[str, str]):
    """``values`` in os.environ inside the block where not set already."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def gpu_target_config(gpu: str) -> str:
    """A ``stream_executor.GpuTargetConfigProto`` (text) for ``gpu`` built from its
    published figures (``GPUS``, ``polyjax.chips``) and the installed cuDNN's
    version: what XLA:GPU's deviceless compile needs to know of the device."""
    g, chip = GPUS[gpu], chips.by_kind(GPUS[gpu]["kind"])
    try:
        major, minor = importlib.metadata.version("nvidia-cudnn-cu13").split(".")[:2]
    except importlib.metadata.PackageNotFoundError:
        major, minor = "9", "8"
    fields = dict(
        threads_per_block_limit=1024,
        threads_per_warp=32,
        shared_memory_per_block=48 << 10,
        shared_memory_per_core=228 << 10,
        shared_memory_per_block_optin=227 << 10,
        threads_per_core_limit=2048,
        core_count=g["sms"],
        fpus_per_core=128,
        block_dim_limit_x=2**31 - 1,
        block_dim_limit_y=65535,
        block_dim_limit_z=65535,
        memory_bandwidth=int(chip.hbm_bandwidth),
        l2_cache_size=g["l2"],
        clock_rate_ghz=g["clock_ghz"],
        device_memory_size=int(chip.hbm),
        registers_per_core_limit=65536,
        registers_per_block_limit=65536,
    )
    lines = [f"  {k}: {v}" for k, v in fields.items()]
    cc = "  cuda_compute_capability {{ major: {} minor: {} }}".format(*g["cc"])
    return "\n".join(
        [
            "gpu_device_info {",
            *lines,
            cc,
            "}",
            'platform_name: "CUDA"',
            f"dnn_version_info {{ major: {major} minor: {minor} }}",
            f'device_description_str: "{g["kind"]}"',
        ]
    )


def get_target(name: str) -> Target:
    """The target ``name`` with its abstract devices (``prepare`` first). A missing
    compiler is a ValueError naming the extra to install."""
    platform, key, topology = parse(name)
    prepare()
    from jax.experimental import topologies

    try:
        if platform == "tpu":
            # what libtpu would ask a TPU VM's metadata server (it warns at length
            # without), set only while it loads: TPU_WORKER_HOSTNAMES means a pod to
            # the cluster detection of later launches
            quiet = {"TPU_ACCELERATOR_TYPE": topology.split(":")[0] + "-8"}
            quiet["TPU_WORKER_HOSTNAMES"] = "localhost"
            with _environ(quiet):
                topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
            chip = chips.by_kind(key)
        else:
            topo = topologies.get_topology_desc(
                platform="cuda", topology=topology, target_config=gpu_target_config(key)
            )
            chip = chips.by_kind(GPUS[key]["kind"])
    except Exception as e:  # a missing plugin surfaces as several error types
        extra = "tpu" if platform == "tpu" else "cuda"
        raise ValueError(
            f"--target={name}: no {platform.upper()} compiler here ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120]}); pip install -e '.[{extra}]' (or '.[aot]')"
        ) from None
    return Target(name, platform, chip, topology, tuple(topo.devices))


# ----------------------------------------------------------------------------
# The compiled program's figures.

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_DTYPE_BYTES |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COLLECTIVE_OP = re.compile(
    r"=\s+(?P<shape>\(.*?\)|\S+)\s+(?P<op>all-gather|reduce-scatter|all-reduce|"
    r"ragged-all-to-all|all-to-all|collective-permute)(?:-start)?\("
)
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def _array_bytes(shape: str) -> list[int]:
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4)
        out.append(math.prod(int(d) for d in dims.split(",") if d) * size)
    return out


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
    """{op: (count, bytes)} of the collectives in a compiled program's HLO text, per
    device; bytes: the op's result (an async start counts once, by its largest
    buffer). A while loop's body appears once (``compile_report`` scales layers)."""
    out = {op: (0, 0) for op in COLLECTIVES}
    for m in _COLLECTIVE_OP.finditer(hlo_text):
        op = "all-to-all" if m["op"] == "ragged-all-to-all" else m["op"]
        count, size = out[op]
        out[op] = (count + 1, size + max(_array_bytes(m["shape"]), default=0))
    return out


def cost(compiled) -> dict[str, float]:
    """flops, bytes accessed and (TPU) the cost model's seconds of a compiled step.
    XLA:GPU gives no cost analysis: XLA's HLO cost analysis of the optimised module
    (run by the CPU client) counts its flops and bytes, custom calls (cuDNN) aside."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    if not analysis:
        from jax._src import xla_bridge
        from jax._src.lib import _jax

        module = compiled.runtime_executable().hlo_modules()[0]
        analysis = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)
    seconds = analysis.get("optimal_seconds")
    return {
        "flops": max(float(analysis.get("flops", 0.0)), 0.0),
        "bytes": max(float(analysis.get("bytes accessed", 0.0)), 0.0),
        "seconds": float(seconds) if seconds is not None and seconds > 0 else None,
    }


@dataclasses.dataclass(frozen=True)
class Figures:
    """What one compiled program costs per device, per step."""

    flops: float
    bytes: float
    seconds: float | None
    collectives: Mapping[str, tuple[int, int]]

    @classmethod
    def of(cls, compiled) -> Figures:
        return cls(**cost(compiled), collectives=collectives(compiled.as_text()))

    @staticmethod
    def combine(terms: list[tuple[float, Figures]]) -> Figures:
        """The sum of ``coefficient x figures`` (a program's cost is linear in its
        layers and microbatches); the time is None if any term has none."""
        lin = lambda get: sum(c * get(f) for c, f in terms)
        times = [f.seconds for _, f in terms]
        secs = None if None in times else lin(lambda f: f.seconds)
        coll = {}
        for op in terms[0][1].collectives:
            count = sum(c * f.collectives[op][0] for c, f in terms)
            coll[op] = (round(count), round(sum(c * f.collectives[op][1] for c, f in terms)))
        return Figures(lin(lambda f: f.flops), lin(lambda f: f.bytes), secs, coll)


class DoesNotFitError(Exception):
    """The step needs more memory per device than the chip has (one line)."""


@dataclasses.dataclass(frozen=True)
class Report:
    target: Target
    plan: memory.MemoryPlan
    figures: Figures
    per_layer: bool  # figures extrapolated from one- and two-layer compiles
    flash: tuple[float, float]  # the flash kernels' (FLOPs, bytes) in the figures
    tokens_per_step: int
    model_flops_per_step: float  # 6N + attention, all devices (flops_per_token)

    @property
    def seconds(self) -> tuple[float, str]:
        """(estimated step time, what it is): XLA:TPU's cost model, else the roofline
        bound max(FLOPs / peak, bytes / bandwidth) of the compiled program."""
        f, chip = self.figures, self.target.chip
        if f.seconds is not None:
            return f.seconds, "XLA:TPU's cost model"
        flops = max(f.flops, self.model_flops_per_step / len(self.target.devices))
        bound = max(flops / chip.peak_flops, f.bytes / chip.hbm_bandwidth)
        why = (
            "XLA:GPU has no cost model time"
            if self.target.platform == "gpu"
            else "XLA:TPU's cost model gave no time for this program"
        )
        return bound, f"roofline bound: max(FLOPs/peak, bytes/bandwidth); {why}"

    @property
    def verdict(self) -> str | None:
        """None when the step fits the chip's HBM, else the one line that says why not."""
        if self.plan.fits:
            return None
        return (
            f"the train step does not fit {self.target.name}: {self.plan.total / 1e9:,.1f} GB "
            f"per device ({self.plan.temp / 1e9:,.1f} GB of temporaries) vs "
            f"{self.target.chip.hbm / 1e9:,.1f} GB of HBM"
        )

    @property
    def mfu(self) -> float:
        seconds = self.seconds[0]
        peak = self.target.chip.peak_flops * len(self.target.devices)
        return self.model_flops_per_step / (seconds * peak)

    def describe(self) -> str:
        f, (seconds, source) = self.figures, self.seconds
        coll = [(op, nb) for op, nb in f.collectives.items() if nb[0]]
        how = "one and two layers compiled, scaled" if self.per_layer else "as compiled"
        if self.target.platform == "tpu":
            how += ", without windowed einsums"
        if self.flash[0]:
            how += (
                f"; with the flash attention's {_si(self.flash[0], 'FLOP').strip()} and "
                f"{_si(self.flash[1], 'B').strip()} from its shapes, timed at peak"
            )
        rows = [
            f"compiled for {self.target} by XLA:{self.target.platform.upper()}",
            self.plan.describe(),
            f"per device per step, the compiler's estimates (not measured; {how}):",
            f"  FLOPs            {_si(f.flops, 'FLOP')}",
            f"  bytes accessed   {_si(f.bytes, 'B')}",
            f"  step time        {seconds:12,.4g} s   ({source})",
            f"  tokens/s         {self.tokens_per_step / seconds:12,.0f}   (estimate, all devices)",
            f"  MFU              {100 * self.mfu:12.1f} %   (estimate: model FLOPs "
            f"{_si(self.model_flops_per_step / len(self.target.devices), 'FLOP').strip()} "
            "per device / (step time x peak))",
            "  collectives      "
            + ("; ".join(f"{op} {n} x, {_si(b, 'B').strip()}" for op, (n, b) in coll) or "none"),
        ]
        return "\n".join(rows)


def _si(x: float, unit: str) -> str:
    """``x`` with a decimal prefix, e.g. 4.29e12 B -> "   4.29 TB"."""
    scale, prefix = next(((s, p) for s, p in _PREFIXES if abs(x) >= s), (1.0, ""))
    return f"{x / scale:8,.4g} {prefix}{unit}"


_PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def _variant(config: Mapping[str, Any], **model) -> dict:
    return memory.with_changes(config, {f"model.{k}": v for k, v in model.items()})


_OOM = re.compile(r"temporaries \(([\d.]+\w?)\) exceeds available HBM \(([\d.]+\w?)\)")


NO_LOOPS = {  # XLA:TPU's collective matmuls: while loops whose body its cost analysis counts once
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}


def compile_step(spec: Spec, target: Target, options: Mapping[str, Any] | None = None):
    """``memory.compile_train_step`` for the target's platform (``options``: XLA's); a
    compile-time HBM refusal (XLA:TPU) becomes ``DoesNotFitError`` naming the
    temporaries and the HBM."""
    mesh_context = (
        jax.sharding.use_abstract_mesh(spec.mesh.abstract_mesh)
        if target.platform == "gpu"  # Pallas Triton kernels lower deviceless only so
        else contextlib.nullcontext()
    )
    try:
        with backend.compiling_for(target.platform), mesh_context:
            return memory.compile_train_step(spec, options)
    except jax.errors.JaxRuntimeError as e:
        m = _OOM.search(str(e))
        if "RESOURCE_EXHAUSTED" in str(e) and m:
            raise DoesNotFitError(
                f"the train step does not fit {target.name}: XLA:TPU needs {m[1]}B of "
                f"temporaries per chip, the chip has {m[2]}B of HBM"
            ) from None
        raise


def plan(spec: Spec, target: Target) -> memory.MemoryPlan:
    """The memory plan of ``spec``'s step compiled for ``target`` (``DoesNotFitError``:
    refused at compile time)."""
    return memory.plan_of(spec, *compile_step(spec, target), target.chip.hbm, "chip table")


def flash_cost(spec: Spec, platform: str) -> tuple[float, float]:
    """(FLOPs, bytes) per device per step of the flash attention kernels, which XLA's
    cost analysis cannot see into (splash gives it no estimate; cuDNN's is a library
    call): from the shapes, 4 L D FLOPs per token and layer forward, 2.5 times that
    backward, over the causal blocks only; K and V read once per query block. (0, 0)
    when the attention is XLA's, which the cost analysis counts itself."""
    model, seq = spec.model, spec.data.seq_len
    dtype = DTYPES[model.dtype]
    with backend.compiling_for(platform):
        impl = attention.resolve(model.attention, dtype, seq)
    if impl == "xla":
        return 0.0, 0.0
    block = math.gcd(attention.SPLASH_BLOCK, seq) if impl == "splash" else 128
    causal = (1 + block / seq) / 2  # the blocks on and below the diagonal
    tokens = spec.data.global_batch * seq * model.n_layers / spec.mesh.devices.size
    d, itemsize = model.d_model, jnp.dtype(dtype).itemsize
    flops = 3.5 * 4 * seq * d * causal * tokens
    kv_reads = 2 * (seq / block) * causal  # K and V, once per query block
    nbytes = (2 + kv_reads + 2 * (4 + kv_reads)) * d * itemsize * tokens
    return flops, nbytes


def loop_free_figures(spec: Spec, target: Target, compiled) -> tuple[Figures, bool]:
    """The step's per-device figures from programs without loops (XLA's cost analysis
    counts a loop's body once): on TPU without the windowed einsums (``NO_LOOPS``);
    scanned layers as one and two layers unrolled; microbatches (a scan) as one and
    two microbatches in one batch. A program's cost being linear in both:
    with P(layers, microbatches), A microbatches, L layers (l = 1 when scanned, else
    L), the optimizer's update once per step and each layer's share of it:
    step = P11 + (A-1)(P12 - P11) + (L-l)(P21 - P11) + (L-l)(A-1)(P22 - P21 - P12 + P11)
    where Pij = P(l + i - 1, j). Also whether the layers were extrapolated."""
    options = NO_LOOPS if target.platform == "tpu" else None
    L, A, scanned = spec.model.n_layers, spec.optim.grad_accum, spec.model.scan_layers
    if not scanned and A == 1 and options is None:
        return Figures.of(compiled), False
    base = 1 if scanned else L
    micro = spec.data.global_batch // A

    def program(layers: int, microbatches: int) -> Figures:
        changes = {"model.n_layers": layers, "model.scan_layers": False}
        changes |= {"optim.grad_accum": 1, "data.global_batch": microbatches * micro}
        config = memory.with_changes(spec.config, changes)
        return Figures.of(
            compile_step(Spec.from_config(config, target.devices), target, options)[0]
        )

    n, a = L - base, A - 1  # layers and microbatches beyond the programs' first
    p11 = program(base, 1)
    terms = [(1.0, p11)]
    if a:
        p12 = program(base, 2)
        terms += [(a, p12), (-a, p11)]
    if n:
        p21 = program(base + 1, 1)
        terms += [(n, p21), (-n, p11)]
    if a and n:  # the extra layers' microbatches beyond the first
        terms += [(n * a, program(base + 1, 2)), (-n * a, p21), (-n * a, p12), (n * a, p11)]
    return Figures.combine(terms), n > 0


def compile_report(spec: Spec, target: Target) -> Report:
    """Compile ``spec``'s train step (its mesh over the target's devices:
    ``Spec.from_config(config, target.devices)``) for ``target`` and report it.

    Memory: the step as it would run. FLOPs, bytes, time and collectives: from
    programs without loops (``loop_free_figures``), with the flash kernels' cost
    (``flash_cost``) added, timed at the chip's peak.
    ``DoesNotFitError``: XLA:TPU refused the step at compile time (``Report.verdict``
    says whether a compiled step fits)."""
    compiled, steps, state, batch = compile_step(spec, target)
    step_plan = memory.plan_of(spec, compiled, steps, state, batch, target.chip.hbm, "chip table")
    figures, per_layer = loop_free_figures(spec, target, compiled)
    flops, nbytes = flash_cost(spec, target.platform)
    if flops:
        seconds = figures.seconds
        if seconds is not None:
            seconds += flops / target.chip.peak_flops
        figures = dataclasses.replace(
            figures, flops=figures.flops + flops, bytes=figures.bytes + nbytes, seconds=seconds
        )
    tokens = spec.data.global_batch * spec.data.seq_len
    return Report(
        target=target,
        plan=step_plan,
        figures=figures,
        per_layer=per_layer,
        flash=(flops, nbytes),
        tokens_per_step=tokens,
        model_flops_per_step=flops_per_token(spec.model, spec.data.seq_len) * tokens,
    )
