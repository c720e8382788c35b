"""Tokenise a corpus once into an ArrayRecord token store, read back as `tokens:<dir>`.

python -m polyjax.data.pretokenize --source jsonl:data/*.jsonl --tokenizer bpe --out DIR
"""

from __future__ import annotations

import argparse
import pathlib

from polyjax.data import sources, store, tokenizers
from polyjax.data.config import DataConfig


def main(argv: list[str] | None = None) -> store.TokenStore:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="a DataConfig source (not tokens:)")
    parser.add_argument("--tokenizer", default="bpe", help="bpe | byte | <path>")
    parser.add_argument("--out", required=True, help="the store directory (must not exist)")
    parser.add_argument("--split", default="train", help="TFDS split")
    parser.add_argument("--vocab_size", type=int, default=1024, help="for a trained BPE")
    parser.add_argument("--tfds_data_dir", default=None)
    parser.add_argument("--cache_dir", default="", help="where a trained BPE is cached")
    args = parser.parse_args(argv)
    if args.source.startswith("tokens:"):
        parser.error("--source is already tokenised (tokens:)")
    out = pathlib.Path(args.out)
    if out.exists():
        parser.error(f"--out {out} exists; remove it or choose another directory")
    cfg = DataConfig(
        source=args.source,
        split=args.split,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        tfds_data_dir=args.tfds_data_dir,
        cache_dir=args.cache_dir,
    )
    source = sources.open_source(cfg.source, split=cfg.split, tfds_data_dir=cfg.tfds_data_dir)
    tok = tokenizers.make_tokenizer(
        cfg.tokenizer, vocab_size=cfg.vocab_size, corpus=source, cache_dir=cfg.resolved_cache_dir()
    )
    result = store.write_store(source, tok, out, spec=cfg.source, split=cfg.split)
    print(f"wrote {result.num_tokens:,} tokens in {len(result.paths)} shard(s) to {out}")
    return result


if __name__ == "__main__":
    main()
