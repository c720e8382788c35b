"""Pre-tokenise a real corpus twice, once uninterrupted and once SIGKILLed halfway and
resumed, and compare the two stores byte for byte (sha256 of every file).

    python benchmarks/pretokenize_resume.py --workdir /tmp/pretok-demo [--mb 200] [--workers 2]

The corpus is offline: the Python sources (.py files, UTF-8, deduplicated) of the Python
installs on this machine (standard libraries and site-packages), as JSONL, up to --mb MB. A
byte-level BPE (--vocab_size, trained on the first --bpe_train_mb MB) is the tokenizer of both
runs. The killed run is stopped from outside (SIGKILL to its whole process group: the main
process and the workers) once half of its shards are recorded as done, then the same command
is rerun."""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

from polyjax.data import tokenizers


def build_corpus(out: pathlib.Path, mb: float, docs_per_jsonl: int = 2000) -> tuple[int, int]:
    """JSONL files of the machine's Python sources (sorted by path, deduplicated, UTF-8
    without NUL bytes) up to `mb` MB of text; returns (documents, bytes)."""
    roots = sorted(glob.glob(f"{sys.base_prefix}/../*/lib/python3*"))  # pyenv-style installs
    roots += [p for p in sys.path if p.endswith("site-packages")]
    seen, records, size = set(), [], 0
    for path in (p for root in roots for p in sorted(glob.glob(f"{root}/**/*.py", recursive=True))):
        try:
            data = pathlib.Path(path).read_bytes()
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.sha256(data).digest()
        if b"\0" in data or not data.strip() or digest in seen:
            continue
        seen.add(digest)
        records.append(json.dumps({"text": text, "path": path}) + "\n")
        size += len(data)
        if size >= mb * 1e6:
            break
    out.mkdir(parents=True)
    for i in range(0, len(records), docs_per_jsonl):
        with open(out / f"python-{i // docs_per_jsonl:03d}.jsonl", "w") as f:
            f.writelines(records[i : i + docs_per_jsonl])
    return len(records), size


def _hashes(directory: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--mb", type=float, default=200.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard_docs", type=int, default=512)
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--bpe_train_mb", type=float, default=20.0)
    args = parser.parse_args()
    work = pathlib.Path(args.workdir)
    corpus = work / "corpus"
    if not corpus.exists():
        start = time.perf_counter()
        docs, size = build_corpus(corpus, args.mb)
        print(
            f"corpus: {docs:,} Python files, {size / 1e6:.1f} MB in {corpus} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    source = f"jsonl:{corpus}/*.jsonl"
    bpe = work / f"bpe{args.vocab_size}.json"
    if not bpe.exists():
        start = time.perf_counter()
        texts, chars = [], 0
        with open(sorted(corpus.glob("*.jsonl"))[0]) as f:
            for line in f:
                texts.append(json.loads(line)["text"])
                chars += len(texts[-1])
                if chars > args.bpe_train_mb * 1e6:
                    break
        tokenizers.train_bpe(iter(texts), args.vocab_size, bpe)
        print(
            f"tokenizer: BPE {args.vocab_size} trained on {args.bpe_train_mb} MB in "
            f"{time.perf_counter() - start:.0f} s -> {bpe}",
            flush=True,
        )
    command = [
        sys.executable, "-m", "polyjax.data.pretokenize", "--source", source,
        "--tokenizer", str(bpe), "--workers", str(args.workers),
        "--shard_docs", str(args.shard_docs), "--progress_every", "30",
    ]  # fmt: skip
    runs = {}
    for name in ("uninterrupted", "killed"):
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work / f"{name}.partial", ignore_errors=True)
        argv = [*command, "--out", str(out)]
        start = time.perf_counter()
        if name == "killed":
            proc = subprocess.Popen(argv, start_new_session=True)
            partial = work / f"{name}.partial"
            total = None
            while proc.poll() is None:
                time.sleep(0.2)
                try:
                    plan = json.loads((partial / "plan.json").read_text())
                    total = -(-plan["documents"] // plan["shard_docs"])
                except (OSError, ValueError):
                    continue
                if len(list(partial.glob("*.done.json"))) >= total / 2:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
            done = len(list(partial.glob("*.done.json")))
            killed_at = time.perf_counter() - start
            print(
                f"killed: SIGKILL to the process group after {killed_at:.0f} s with "
                f"{done}/{total} shards done (exit {proc.returncode})",
                flush=True,
            )
            start = time.perf_counter()
            subprocess.run(argv, check=True)
            runs[name] = killed_at + time.perf_counter() - start
            print(f"resumed: finished in {time.perf_counter() - start:.0f} s", flush=True)
        else:
            subprocess.run(argv, check=True)
            runs[name] = time.perf_counter() - start
    a, b = (_hashes(work / name) for name in runs)
    meta = json.loads((work / "uninterrupted" / "meta.json").read_text())
    size = sum((work / "uninterrupted" / f).stat().st_size for f in a)
    print(
        f"stores: {meta['num_tokens']:,} tokens from {meta['text_bytes'] / 1e6:.1f} MB of text "
        f"({meta['num_documents']:,} documents) in {len(meta['shards'])} shards, "
        f"{size / 1e6:.1f} MB on disk; uninterrupted {runs['uninterrupted']:.0f} s, killed + "
        f"resumed {runs['killed']:.0f} s"
    )
    same = a == b
    print(f"{len(a)} files; sha256 of every file equal: {same}")
    digest = hashlib.sha256(json.dumps(a, sort_keys=True).encode()).hexdigest()
    print(f"sha256 over the file hashes: {digest}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
