"""The accelerators polyjax knows by their published figures: memory, bf16 peak and
memory bandwidth per device, keyed by a substring of jax's ``device_kind``.

Read by the memory plan (a device's memory when the runtime does not say), the
trainer's MFU, and ``polyjax.aot`` (compile targets and their estimates). The first
entry whose key the device kind contains wins, so the specific kinds come first
("TPU v5 lite" before "TPU v5", which is how jax names a v5p; "H100 PCIe" before
"H100").
"""

from __future__ import annotations

import dataclasses

GB, GIB = 1e9, 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    key: str  # a substring of jax's device_kind
    platform: str  # "tpu" or "gpu"
    hbm: float  # bytes of memory per device
    peak_flops: float  # bf16 dense FLOP/s per device
    hbm_bandwidth: float  # bytes/s per device


CHIPS = (
    Chip("H100 PCIe", "gpu", 80 * GB, 756e12, 2.0e12),
    Chip("H100", "gpu", 80 * GB, 989e12, 3.35e12),  # SXM
    Chip("H200", "gpu", 141 * GB, 989e12, 4.8e12),
    Chip("B200", "gpu", 180 * GB, 2250e12, 8.0e12),
    Chip("A100-SXM4-40GB", "gpu", 40 * GB, 312e12, 1.555e12),
    Chip("A100-PCIE-40GB", "gpu", 40 * GB, 312e12, 1.555e12),
    Chip("A100", "gpu", 80 * GB, 312e12, 2.0e12),
    Chip("L4", "gpu", 24 * GB, 121e12, 0.3e12),
    Chip("TPU v4", "tpu", 32 * GIB, 275e12, 1.2e12),
    Chip("TPU v5 lite", "tpu", 16 * GIB, 197e12, 0.819e12),
    Chip("TPU v5e", "tpu", 16 * GIB, 197e12, 0.819e12),
    Chip("TPU v5p", "tpu", 95 * GIB, 459e12, 2.765e12),
    Chip("TPU v5", "tpu", 95 * GIB, 459e12, 2.765e12),  # jax's kind for a v5p
    Chip("TPU v6 lite", "tpu", 32 * GIB, 918e12, 1.64e12),
    Chip("TPU v6e", "tpu", 32 * GIB, 918e12, 1.64e12),
)


def by_kind(device_kind: str) -> Chip | None:
    """The first chip whose key ``device_kind`` contains (case-insensitive), or None."""
    kind = device_kind.lower()
    return next((c for c in CHIPS if c.key.lower() in kind), None)
