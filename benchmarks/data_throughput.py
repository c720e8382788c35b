"""Data pipeline throughput (tokens/s per host) on a pre-tokenised store, against what the 1B
dense model consumes on 8 accelerators.

    python benchmarks/data_throughput.py --store /data/tokens      # a store of your corpus
    python benchmarks/data_throughput.py                           # builds one from Shakespeare

Times the training iterator of a `tokens:` store (windows read from the ArrayRecord shards,
shuffled, packed into batches with segment ids and positions) at the 1B shapes (seq_len
4096, global batch 64: one host feeding 8 accelerators reads all 64 rows) for each
reader-thread count, and prints the ratio to the consumption of the 1B dense model at the
given MFU on 8 accelerators, with the arithmetic: FLOPs/token = 6 N + 12 L d T (N the matmul
parameters, all but the input embedding; PaLM's count, as polyjax.model.flops_per_token), and
tokens/s = devices x peak x MFU / (FLOPs/token)."""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import tempfile
import time

from polyjax.data import DataConfig, build, make_pipeline, sources, tokenizers

# The 1B dense model (the paper's: PolyNorm's FFN is not gated, so d_ff = 8256).
D_MODEL, N_LAYERS, D_FF, VOCAB, SEQ_LEN, GLOBAL_BATCH = 2048, 24, 8256, 32000, 4096, 64
H100_PEAK = 989e12  # bf16 dense FLOP/s (SXM)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores visible, load average {os.getloadavg()[0]:.1f}"


def consumption(args) -> float:
    """Tokens/s the 1B dense model trains on `args.devices` accelerators, printed."""
    d, L, f, V, T = args.d_model, args.n_layers, args.d_ff, args.vocab, args.seq_len
    per_layer = 4 * d * d + 2 * d * f  # q, k, v, o and the FFN's two matrices
    n = L * per_layer + d * V  # + the output head; the input embedding is a lookup
    flops = 6 * n + 12 * L * d * T
    rate = args.devices * args.peak * args.mfu / flops
    print(
        f"1B consumption: N = {L} x (4 x {d}^2 + 2 x {d} x {f}) + {d} x {V} = {n:,} matmul "
        f"parameters; FLOPs/token = 6 N + 12 x {L} x {d} x {T} = {flops:.4g}; "
        f"{args.devices} x {args.peak:.4g} FLOP/s x {args.mfu:.0%} MFU / {flops:.4g} = "
        f"{rate:,.0f} tokens/s ({rate / args.devices:,.0f} per accelerator)"
    )
    return rate


def _shakespeare_store(directory: pathlib.Path) -> pathlib.Path:
    docs = sources.open_source("shakespeare")
    out = directory / "shakespeare-bytes"
    build.build_store(docs, tokenizers.ByteTokenizer(), out, spec="shakespeare")
    return out


def _rate(pipeline, batches: int) -> float:
    it = pipeline.train_iter()
    next(it)  # start-up (thread pool) outside the timing
    start = time.perf_counter()
    tokens = sum(next(it)["inputs"].size for _ in range(batches))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", help="a pre-tokenised store (default: Shakespeare, bytes)")
    parser.add_argument("--batches", type=int, default=20, help="batches timed per setting")
    parser.add_argument("--threads", default="0,1,2,4", help="reader-thread counts to time")
    parser.add_argument("--seq_len", type=int, default=SEQ_LEN)
    parser.add_argument("--global_batch", type=int, default=GLOBAL_BATCH)
    parser.add_argument("--d_model", type=int, default=D_MODEL)
    parser.add_argument("--n_layers", type=int, default=N_LAYERS)
    parser.add_argument("--d_ff", type=int, default=D_FF)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--devices", type=int, default=8, help="accelerators on the host")
    parser.add_argument("--peak", type=float, default=H100_PEAK, help="FLOP/s per device")
    parser.add_argument("--mfu", type=float, default=0.5)
    args = parser.parse_args()
    print(f"host: {_cpu()}")
    need = consumption(args)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(args.store) if args.store else _shakespeare_store(pathlib.Path(tmp))
        cfg = DataConfig(
            source=f"tokens:{path}",
            seq_len=args.seq_len,
            global_batch=args.global_batch,
            document_boundaries=True,
            val_fraction=0.01,
            cache_dir=tmp,
        )
        start = time.perf_counter()
        p = make_pipeline(cfg)
        opened = time.perf_counter() - start
        store = p.train.span.store
        print(
            f"store: {path}: {store.num_tokens:,} tokens ({store.dtype.name}) in "
            f"{len(store.paths)} shard(s), vocabulary {p.tokenizer.vocab_size}; opened and "
            f"checked in {opened:.2f} s; {p.train.count:,} training windows of "
            f"{args.seq_len + 1}; batch {args.global_batch} x {args.seq_len}, document "
            "boundaries on"
        )
        for threads in (int(t) for t in args.threads.split(",")):
            p.read_threads = threads
            rate = _rate(p, args.batches)
            print(
                f"read_threads={threads}: {rate:,.0f} tokens/s on this host = "
                f"{rate / need:.2f}x the 1B model's consumption on {args.devices} accelerators"
            )


if __name__ == "__main__":
    main()
