"""Data pipeline throughput (tokens/s) against what training consumes.

    python benchmarks/data_throughput.py [--consumption 20000] [--seq_len 256] [--global_batch 32]

Builds the default pipeline (Shakespeare, BPE 1024) in a fresh cache (timing the one-off
BPE training and tokenisation), then times the training iterator for each reader-thread
count and prints tokens/s and the ratio to --consumption, the rate of the training run the
pipeline feeds (the target is >= 10x)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time

from polyjax.data import DataConfig, make_pipeline


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores visible"


def _rate(pipeline, batches: int) -> float:
    it = pipeline.train_iter()
    next(it)  # start-up (thread pool) outside the timing
    start = time.perf_counter()
    tokens = sum(next(it)["inputs"].size for _ in range(batches))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--consumption", type=float, default=20000.0, help="tokens/s trained")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--global_batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--threads", default="0,2,4", help="reader-thread counts to time")
    args = parser.parse_args()
    print(f"device: {_cpu()}")
    with tempfile.TemporaryDirectory() as cache:
        cfg = DataConfig(
            seq_len=args.seq_len,
            global_batch=args.global_batch,
            document_boundaries=True,
            cache_dir=cache,
        )
        start = time.perf_counter()
        p = make_pipeline(cfg)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        make_pipeline(cfg)
        warm = time.perf_counter() - start
        print(
            f"corpus: {cfg.source}, tokenizer {cfg.tokenizer} {p.tokenizer.vocab_size}, "
            f"{p.train.count} training windows of {cfg.seq_len + 1} tokens, "
            f"batch {cfg.global_batch} x {cfg.seq_len}"
        )
        print(f"first build (BPE training + tokenisation): {cold:.2f} s; cached open: {warm:.3f} s")
        for threads in (int(t) for t in args.threads.split(",")):
            q = make_pipeline(dataclasses.replace(cfg, read_threads=threads))
            rate = _rate(q, args.batches)
            print(
                f"read_threads={threads}: {rate:,.0f} tokens/s = {rate / args.consumption:.1f}x "
                f"the consumption of {args.consumption:,.0f} tokens/s"
            )


if __name__ == "__main__":
    main()
