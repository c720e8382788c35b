"""The gpu size's corpus: this machine's Python sources and docs, pre-tokenised.

    python -m experiments.corpus --out runs/corpus [--mb 200] [--vocab_size 16384] [--workers 8]
    python -m experiments.corpus --out runs/corpus4096 --vocab_size 4096 --roots interpreters \
        --one_per_path --mb 1000     # the scaling ladder's (experiments/ladder.py)

Real text that needs no network: every .py, .rst, .md and .txt file (UTF-8, no NUL
bytes, deduplicated by content) under the Python installs of this machine (the
standard libraries of the interpreters beside this one, and the site-packages on
sys.path), in a fixed shuffled order (so that the store's held-out tail is a random
sample of files, not the last package alphabetically), up to ``--mb`` MB. Then a
byte-level BPE trained on the first ``--bpe_mb`` MB, and the token store
(``python -m polyjax.data.pretokenize``, parallel and resumable) in ``OUT/tokens``,
which ``configs/*.py:size=gpu`` reads as ``data.source=tokens:runs/corpus/tokens``.

``--roots interpreters`` leaves out the site-packages of the running virtual
environment, so that every venv on the machine builds the same corpus (the ladder's
runs, trained in several sessions, must all see one corpus); ``--one_per_path`` keeps
one file per path below its root (``asyncio/tasks.py`` from one interpreter only), so
that the held-out files have no near-copy from another Python version in training.

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


def python_roots(interpreters_only: bool = False) -> list[str]:
    """The standard libraries of the interpreters installed beside this one
    (pyenv-style layouts) and this interpreter's, and (unless ``interpreters_only``)
    the site-packages on sys.path (a virtual environment's own)."""
    roots = sorted(glob.glob(f"{sys.base_prefix}/../*/lib/python3*"))
    roots += sorted(glob.glob(f"{sys.base_prefix}/lib/python3*"))
    if not interpreters_only:
        roots += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    return list(dict.fromkeys(str(pathlib.Path(r).resolve()) for r in roots))


def collect(roots: list[str], mb: float, seed: int = 0, one_per_path: bool = False) -> list[dict]:
    """The documents ({"text", "path"}) of ``roots``: every file with a suffix of
    SUFFIXES, UTF-8 without NUL bytes, first copy of each content only (and with
    ``one_per_path`` of each path below its root, ``site-packages/`` dropped), in a
    shuffled order fixed by ``seed``, up to ``mb`` MB of text. An editable install's
    finder (``__editable__*``, which names its checkout) is left out."""
    where = {
        p: p[len(root) :].removeprefix("/site-packages")
        for root in roots
        for s in SUFFIXES
        for p in glob.glob(f"{root}/**/*{s}", recursive=True)
        if not pathlib.Path(p).name.startswith("__editable__")
    }
    paths = sorted(where)
    order = np.random.default_rng(seed).permutation(len(paths))
    seen, seen_paths, docs, size = set(), set(), [], 0
    for i in order:
        if one_per_path and where[paths[i]] in seen_paths:
            continue
        try:
            data = pathlib.Path(paths[i]).read_bytes()
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.sha256(data).digest()
        if b"\0" in data or not text.strip() or digest in seen:
            continue
        seen.add(digest)
        seen_paths.add(where[paths[i]])
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
    parser.add_argument(
        "--roots",
        choices=("all", "interpreters"),
        default="all",
        help="interpreters: leave out the running venv's site-packages",
    )
    parser.add_argument(
        "--one_per_path", action="store_true", help="one file per path below its root"
    )
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    corpus = out / "corpus"
    if not (corpus / "done.json").exists():
        roots = python_roots(interpreters_only=args.roots == "interpreters")
        docs = collect(roots, args.mb, one_per_path=args.one_per_path)
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
