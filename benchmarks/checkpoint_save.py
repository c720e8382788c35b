"""What a checkpoint save costs the training loop: the time its thread spends in
``Checkpointer.save`` (and in ``close`` at the end), with ``--gap`` seconds of other
work (the training steps) between two saves, on a train state of the given size.

Everything else a save does (Orbax writing the arrays, the integrity marker's
checksums) should happen in the background, within the gap.

    python benchmarks/checkpoint_save.py --size tiny
    python benchmarks/checkpoint_save.py --size small --saves 6
    python benchmarks/checkpoint_save.py --size small --set model.d_model=1024 --set model.d_ff=3072

The script uses only ``Checkpointer(workdir, every=, keep=, async_save=)``,
``save(step, state, data_state, config)`` and ``close()``, so it runs against older
versions of polyjax too (``PYTHONPATH=<their checkout>``): compare in the same session.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
from flax import nnx

from configs import dense
from polyjax import checkpoint as ckpt
from polyjax import sharding as shd
from polyjax import train
from polyjax.config import Spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", help="configs/dense.py size")
    parser.add_argument("--saves", type=int, default=8)
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between saves")
    parser.add_argument("--set", action="append", default=[], help="field=int: model.d_model=1024")
    args = parser.parse_args()

    config = dense.get_config(f"size={args.size}")
    for item in args.set:
        field, _, value = item.partition("=")
        *parents, leaf = field.split(".")
        section = config
        for name in parents:
            section = section[name]
        section[leaf] = int(value)
    spec = Spec.from_config(config)
    model = shd.create_model(spec.model, spec.mesh, spec.rules, 0)
    state = train.make_steps(spec, model).init(*nnx.split(model, nnx.Param, ...)[1:])
    mib = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
    blocked = []
    with tempfile.TemporaryDirectory() as workdir:
        saver = ckpt.Checkpointer(workdir, every=1, keep=2, async_save=True)
        for step in range(1, args.saves + 1):
            time.sleep(args.gap)  # the steps between two saves
            start = time.perf_counter()
            saver.save(step, state, {"next_batch": step}, spec.config)
            blocked.append(time.perf_counter() - start)
        start = time.perf_counter()
        saver.close()
        closing = time.perf_counter() - start
    print(
        f"size={args.size} {' '.join(args.set)} state {mib:.1f} MiB on {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), {args.saves} saves {args.gap:g} s apart: "
        f"the loop blocked {statistics.median(blocked[1:]) * 1e3:.1f} ms per save "
        f"(median of saves 2..{args.saves}; first {blocked[0] * 1e3:.0f} ms), "
        f"close {closing * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
