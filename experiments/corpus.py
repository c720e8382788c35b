"""The gpu size's corpus: this machine's Python sources and docs, pre-tokenised.

    python -m experiments.corpus --out runs/corpus [--mb 200] [--vocab_size 16384] [--workers 8]

Real text that needs no network: every .py, .rst, .md and .txt file (UTF-8, no NUL
bytes, deduplicated by content) under the Python installs of this machine (the
standard libraries of the interpreters beside this one, and the site-packages on
sys.path), in a fixed shuffled order (so that the store's held-out tail is a random
sample of files, not the last package alphabetically), up to ``--mb`` MB. Then a
byte-level BPE trained on the first ``--bpe_mb`` MB, and the token store
(``python -m polyjax.data.pretokenize``, parallel and resumable) in ``OUT/tokens``,
which ``configs/*.py:size=gpu`` reads as ``data.source=tokens:runs/corpus/tokens``.

Each step is skipped when its output exists, so a killed build is finished by
rerunning the command. Which files are found depends on what is installed: the
store's ``meta.json`` records its size and fingerprint.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import pathlib
import subprocess
import sys

import numpy as np

from polyjax.data import tokenizers

SUFFIXES = (".py", ".rst", ".md", ".txt")


def python_roots() -> list[str]:
    """The standard libraries of the interpreters installed beside this one
    (pyenv-style layouts) and this interpreter's, and the site-packages on sys.path."""
    roots = sorted(glob.glob(f"{sys.base_prefix}/../*/lib/python3*"))
    roots += sorted(glob.glob(f"{sys.base_prefix}/lib/python3*"))
    roots += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    return list(dict.fromkeys(str(pathlib.Path(r).resolve()) for r in roots))


def collect(roots: list[str], mb: float, seed: int = 0) -> list[dict]:
    """The documents ({"text", "path"}) of ``roots``: every file with a suffix of
    SUFFIXES, UTF-8 without NUL bytes, first copy of each content only, in a shuffled
    order fixed by ``seed``, up to ``mb`` MB of text."""
    paths = sorted(
        {
            p
            for root in roots
            for s in SUFFIXES
            for p in glob.glob(f"{root}/**/*{s}", recursive=True)
        }
    )
    order = np.random.default_rng(seed).permutation(len(paths))
    seen, docs, size = set(), [], 0
    for i in order:
        try:
            data = pathlib.Path(paths[i]).read_bytes()
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.sha256(data).digest()
        if b"\0" in data or not text.strip() or digest in seen:
            continue
        seen.add(digest)
        docs.append({"text": text, "path": paths[i]})
        size += len(data)
        if size >= mb * 1e6:
            break
    return docs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder: corpus/, bpe<V>.json, tokens/")
    parser.add_argument("--mb", type=float, default=200.0, help="MB of text at most")
    parser.add_argument("--vocab_size", type=int, default=16384)
    parser.add_argument("--bpe_mb", type=float, default=20.0, help="MB the BPE is trained on")
    parser.add_argument("--workers", type=int, default=8, help="pretokenize worker processes")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    corpus = out / "corpus"
    if not (corpus / "done.json").exists():
        docs = collect(python_roots(), args.mb)
        corpus.mkdir(parents=True, exist_ok=True)
        for k in range(0, len(docs), 2000):
            with open(corpus / f"python-{k // 2000:04d}.jsonl", "w") as f:
                f.writelines(json.dumps(d) + "\n" for d in docs[k : k + 2000])
        size = sum(len(d["text"].encode()) for d in docs)
        (corpus / "done.json").write_text(json.dumps({"documents": len(docs), "bytes": size}))
        print(f"corpus: {len(docs):,} files, {size / 1e6:.1f} MB in {corpus}", flush=True)
    bpe = out / f"bpe{args.vocab_size}.json"
    if not bpe.exists():
        texts, chars = [], 0
        for path in sorted(corpus.glob("*.jsonl")):
            with open(path) as f:
                for line in f:
                    texts.append(json.loads(line)["text"])
                    chars += len(texts[-1])
                    if chars > args.bpe_mb * 1e6:
                        break
            if chars > args.bpe_mb * 1e6:
                break
        tokenizers.train_bpe(iter(texts), args.vocab_size, bpe)
        print(f"tokenizer: byte-level BPE of {args.vocab_size} -> {bpe}", flush=True)
    command = [
        sys.executable, "-m", "polyjax.data.pretokenize",
        "--source", f"jsonl:{corpus.absolute()}/*.jsonl", "--tokenizer", str(bpe.absolute()),
        "--workers", str(args.workers), "--out", str((out / "tokens").absolute()),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    meta = json.loads((out / "tokens" / "meta.json").read_text())
    print(f"store: {meta['num_tokens']:,} tokens in {out / 'tokens'}", flush=True)


if __name__ == "__main__":
    main()
