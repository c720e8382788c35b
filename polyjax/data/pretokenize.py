"""Pre-tokenise a corpus into a token store (`tokens:<dir>`), in parallel and resumably.

    python -m polyjax.data.pretokenize --source 'jsonl:/data/*.jsonl' --tokenizer bpe \\
        --vocab_size 32000 --workers 16 --out /data/tokens

Shard k holds documents [k D, (k+1) D) (D = --shard_docs): the store depends only on the
corpus and the tokenizer, not on --workers or on interruptions. A killed run is resumed by
rerunning the same command (finished shards are kept); a rerun on a finished store does
nothing. The tokenizer is saved beside the shards (a "bpe" is trained first, on the first
256M characters). Progress (shards, documents, tokens, MB, rate, ETA) goes to stderr.
Errors (bad documents, a rerun with other inputs) are one line on stderr, exit status 2.
See polyjax/data/build.py for the layout."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

from polyjax.data import build, sources, store, tokenizers
from polyjax.data.config import DataConfig, one_line

# --- the command -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Opener:
    """Reopens a source by its spec in a worker process (picklable)."""

    spec: str
    split: str
    tfds_data_dir: str | None

    def __call__(self):
        return sources.open_source(self.spec, split=self.split, tfds_data_dir=self.tfds_data_dir)


def _saved_tokenizer(partial: pathlib.Path, tokenizer_arg: str):
    """The tokenizer an interrupted run of the same arguments saved, if any: a resumed run
    uses it rather than training a BPE again."""
    try:
        plan = json.loads((partial / build.PLAN).read_text())
    except (OSError, ValueError):
        return None
    if plan.get("tokenizer_arg") != tokenizer_arg:
        return None
    info = plan["tokenizer"]
    file = partial / info["file"] if info.get("file") else None
    return tokenizers.load_saved(info["kind"], file, fix=f"delete {partial} and rerun")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m polyjax.data.pretokenize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", help="a DataConfig source (not tokens:)")
    parser.add_argument("--out", help="the store directory (tokens:OUT)")
    parser.add_argument("--tokenizer", default="bpe", help="bpe | byte | <tokenizer file>")
    parser.add_argument("--vocab_size", type=int, default=1024, help="for a trained BPE")
    parser.add_argument("--split", default="train", help="TFDS split")
    parser.add_argument("--tfds_data_dir", default=None)
    parser.add_argument("--cache_dir", default="", help="where a trained BPE is cached")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument(
        "--shard_docs", type=int, default=build.SHARD_DOCS, help="documents a shard"
    )
    parser.add_argument("--progress_every", type=float, default=5.0, help="seconds")
    parser.add_argument("--verify", metavar="DIR", help="check a store's checksums and exit")
    return parser.parse_args(argv)


def run(args) -> store.TokenStore:
    """The command's work; bad input raises ValueError (one line)."""
    if args.verify:
        result = store.TokenStore(args.verify)
        result.verify()
        result.tokenizer()
        print(f"{args.verify}: {result.num_tokens:,} tokens in {len(result.paths)} intact shards")
        return result
    if not args.source or not args.out:
        raise ValueError("--source and --out are required (or --verify DIR)")
    if args.source.startswith("tokens:"):
        raise ValueError(f"--source {args.source} is already tokenised (tokens:)")
    for name in ("workers", "shard_docs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} must be >= 1")
    cfg = DataConfig(
        source=args.source,
        split=args.split,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        tfds_data_dir=args.tfds_data_dir,
        cache_dir=args.cache_dir,
    )
    out = pathlib.Path(args.out)
    if out.exists() and not (out / "meta.json").is_file():
        raise ValueError(f"--out {out} exists and is not a token store; choose another --out")
    if (out / "meta.json").is_file():
        done = store.TokenStore(out)
        print(f"{out} is already a complete store ({done.num_tokens:,} tokens); nothing to do")
        return done
    tokenizer_arg = cfg.tokenizer + (f":{cfg.vocab_size}" if cfg.tokenizer == "bpe" else "")
    partial = out.with_name(out.name + ".partial")
    # Cheap checks first: the tokenizer file, the source's files (sizes only).
    tok = _saved_tokenizer(partial, tokenizer_arg)
    if tok is None and cfg.tokenizer != "bpe":
        tok = tokenizers.make_tokenizer(cfg.tokenizer, vocab_size=cfg.vocab_size)
    sources.source_bytes(cfg.source, split=cfg.split, tfds_data_dir=cfg.tfds_data_dir)
    opener = _Opener(cfg.source, cfg.split, cfg.tfds_data_dir)
    docs = opener()
    tok = tok or tokenizers.make_tokenizer(
        cfg.tokenizer, vocab_size=cfg.vocab_size, corpus=docs, cache_dir=cfg.resolved_cache_dir()
    )
    start = time.perf_counter()
    result = build.build_store(
        docs,
        tok,
        out,
        spec=cfg.source,
        split=cfg.split,
        tokenizer_arg=tokenizer_arg,
        open_docs=opener,
        workers=args.workers,
        shard_docs=args.shard_docs,
        progress_every=args.progress_every,
    )
    print(
        f"wrote {result.num_tokens:,} tokens ({result.meta['num_documents']:,} documents) in "
        f"{len(result.paths)} shard(s) to {out} in {time.perf_counter() - start:.1f} s; "
        f"train on it with data.source=tokens:{out}"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a worker died: the run resumes
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
