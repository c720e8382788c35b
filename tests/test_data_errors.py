"""Every bad data, tokenizer and cache input is one ValueError line naming the path and the
fix, raised before anything is written outside the cache; the checks that need no
tokenising (`validate`) come first and write nothing at all."""

import dataclasses
import json
import os
import pathlib

import pytest

from polyjax.data import (
    DataConfig,
    build,
    make_pipeline,
    packing,
    pipeline,
    sources,
    store,
    tokenizers,
    validate,
)

SCENES = sources.shakespeare_scenes()


class _Docs(list):
    fingerprint = "scenes"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A BPE-600 tokenizer.json."""
    d = tmp_path_factory.mktemp("bpe")
    tokenizers.make_tokenizer("bpe", vocab_size=600, corpus=_Docs(SCENES[:20]), cache_dir=d)
    (path,) = (d / "tokenizers").iterdir()
    return path


def _jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return path


def _store(directory, tok=None):
    tok = tok or tokenizers.ByteTokenizer()
    build.build_store(_Docs(SCENES[:6]), tok, directory, spec="scenes", shard_docs=2)
    return directory


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# Each case: (name, make(tmp, bpe) -> (DataConfig kwargs, model vocab), text the message must
# hold (the path), whether `validate` (no tokenising, nothing written) catches it).
def _text_missing(t, b):
    return dict(source=f"text:{t}/none/*.txt"), 300, "none/*.txt", True


def _text_empty(t, b):
    (t / "a.txt").write_text("")
    return dict(source=f"text:{t}/a.txt"), 300, "a.txt", True


def _jsonl_missing(t, b):
    return dict(source=f"jsonl:{t}/gone.jsonl"), 300, "gone.jsonl", True


def _jsonl_empty(t, b):
    (t / "e.jsonl").write_text("")
    return dict(source=f"jsonl:{t}/e.jsonl"), 300, "e.jsonl", True


def _jsonl_blank_lines(t, b):
    (t / "e.jsonl").write_text("\n \n\n")
    return dict(source=f"jsonl:{t}/e.jsonl"), 300, "e.jsonl", True


def _jsonl_without_field(t, b):
    _jsonl(t / "d.jsonl", SCENES[:4], field="body")
    return dict(source=f"jsonl:{t}/d.jsonl"), 300, "d.jsonl at byte 0 has no text field", True


def _jsonl_malformed(t, b):
    _jsonl(t / "d.jsonl", SCENES[:4])
    with open(t / "d.jsonl", "a") as f:
        f.write('{"text": "unterminated\n')
    return dict(source=f"jsonl:{t}/d.jsonl"), 300, "d.jsonl at byte", True


def _jsonl_not_a_string(t, b):
    (t / "d.jsonl").write_text('{"text": 3}\n{"text": "a"}\n{"text": "b"}\n')
    return dict(source=f"jsonl:{t}/d.jsonl"), 300, "d.jsonl at byte 0", True


def _jsonl_not_utf8(t, b):
    (t / "d.jsonl").write_bytes(b'{"text": "caf\xe9"}\n' * 4)
    return dict(source=f"jsonl:{t}/d.jsonl"), 300, "d.jsonl at byte 0", True


def _text_binary(t, b):
    for i in range(3):
        (t / f"{i}.txt").write_text(SCENES[i])
    (t / "1.txt").write_bytes(bytes(range(4)) * 64)  # NUL bytes: valid UTF-8, not text
    return dict(source=f"text:{t}/*.txt"), 300, "1.txt holds NUL bytes", True


def _text_not_utf8(t, b):
    for i in range(3):
        (t / f"{i}.txt").write_bytes("Café au lait. ".encode("latin-1") * 50)
    return dict(source=f"text:{t}/*.txt"), 300, ".txt is not UTF-8 text", True


def _text_too_small(t, b):
    """Two files: one held out for validation, the other trains; with the byte tokenizer
    the training split holds 30 bytes + an eos, one token short of seq_len + 1 = 32."""
    (t / "a.txt").write_text("x" * 30)
    (t / "b.txt").write_text("y" * 30)
    return dict(source=f"text:{t}/*.txt"), 300, "split of data.source='text:", True


def _arrayrecord_corrupt(t, b):
    (t / "x.array_record").write_bytes(SCENES[0].encode())
    return dict(source=f"arrayrecord:{t}/*.array_record"), 300, "x.array_record", False


def _tokens_without_store(t, b):
    return dict(source=f"tokens:{t}/nostore"), 300, "nostore is not a token store", True


def _tokens_interrupted(t, b):
    (t / "s.partial").mkdir()
    return dict(source=f"tokens:{t}/s"), 300, "s.partial holds an interrupted", True


def _tokens_meta_garbage(t, b):
    (_store(t / "s") / "meta.json").write_bytes(bytes(range(256)))
    return dict(source=f"tokens:{t}/s"), 300, "s/meta.json is unreadable", True


def _tokens_meta_not_a_store(t, b):
    (_store(t / "s") / "meta.json").write_text('{"format": "polyjax-tokens-v2"}')
    return dict(source=f"tokens:{t}/s"), 300, "s/meta.json is incomplete", True


def _tokens_shard_truncated(t, b):
    shard = _store(t / "s") / store.shard_name(1)
    shard.write_bytes(shard.read_bytes()[:100])
    return dict(source=f"tokens:{t}/s"), 300, "tokens-00001.array_record has 100 bytes", True


def _tokens_shard_missing(t, b):
    (_store(t / "s") / store.shard_name(2)).unlink()
    return dict(source=f"tokens:{t}/s"), 300, "tokens-00002.array_record is missing", True


def _tokens_tokenizer_corrupt(t, b):
    (_store(t / "s", tokenizers.HFTokenizer(b)) / "tokenizer.json").write_text("{")
    return dict(source=f"tokens:{t}/s"), 700, "s/tokenizer.json", True


def _tokens_other_tokenizer(t, b):
    _store(t / "s")
    return dict(source=f"tokens:{t}/s", tokenizer=str(b)), 700, f"the store {t}/s", True


def _tokens_val_other_tokenizer(t, b):
    _store(t / "s")
    _store(t / "v", tokenizers.HFTokenizer(b))
    return dict(source=f"tokens:{t}/s", val_split=f"tokens:{t}/v"), 700, f"store {t}/v", True


def _tokens_vocab_over_model(t, b):
    _store(t / "s", tokenizers.HFTokenizer(b))
    return dict(source=f"tokens:{t}/s", tokenizer="bpe"), 512, f"the store {t}/s has a", True


def _tokenizer_missing(t, b):
    _jsonl(t / "d.jsonl", SCENES[:4])
    return dict(source=f"jsonl:{t}/d.jsonl", tokenizer=f"{t}/tok.json"), 300, "tok.json", True


def _tokenizer_json_garbage(t, b):
    _jsonl(t / "d.jsonl", SCENES[:4])
    (t / "tokenizer.json").write_bytes(bytes(range(256)))
    cfg = dict(source=f"jsonl:{t}/d.jsonl", tokenizer=f"{t}/tokenizer.json")
    return cfg, 300, "tokenizer.json is not a Hugging Face", True


def _tokenizer_model_garbage(t, b):
    _jsonl(t / "d.jsonl", SCENES[:4])
    (t / "sp.model").write_text(SCENES[0][:300])
    cfg = dict(source=f"jsonl:{t}/d.jsonl", tokenizer=f"{t}/sp.model")
    return cfg, 300, "sp.model is not a SentencePiece model", True


def _vocab_byte_over_model(t, b):
    _jsonl(t / "d.jsonl", SCENES[:4])
    return dict(source=f"jsonl:{t}/d.jsonl"), 256, "'byte' has a vocabulary of 257", True


def _vocab_bpe_over_model(t, b):
    _jsonl(t / "d.jsonl", SCENES[:4])
    cfg = dict(source=f"jsonl:{t}/d.jsonl", tokenizer="bpe", vocab_size=2048)
    return cfg, 1024, "of 2048 tokens, more than model.vocab_size=1024", True


def _vocab_file_over_model(t, b):
    _jsonl(t / "d.jsonl", SCENES[:4])
    return dict(source=f"jsonl:{t}/d.jsonl", tokenizer=str(b)), 512, str(b), True


def _corpus_over_bound(t, b):
    _jsonl(t / "d.jsonl", SCENES[:4])
    cfg = dict(source=f"jsonl:{t}/d.jsonl", max_tokenize_bytes=10_000)
    return cfg, 300, "python -m polyjax.data.pretokenize --source jsonl:", True


def _cached_meta_garbage(t, b):
    _jsonl(t / "d.jsonl", SCENES[:4])
    cfg = dict(source=f"jsonl:{t}/d.jsonl", cache_dir=str(t.parent / "cache"))
    make_pipeline(_config(cfg))
    for meta in (t.parent / "cache" / "tokens").glob("*/meta.json"):
        meta.write_bytes(bytes(range(200, 256)))
    return cfg, 300, "meta.json is unreadable", False


def _cached_shard_garbage(t, b):
    _jsonl(t / "d.jsonl", SCENES[:4])
    cfg = dict(source=f"jsonl:{t}/d.jsonl", cache_dir=str(t.parent / "cache"))
    make_pipeline(_config(cfg))
    for shard in (t.parent / "cache" / "tokens").glob("*/tokens-00000.array_record"):
        data = bytearray(shard.read_bytes())
        data[1000:5096] = os.urandom(4096)  # same-size garbage
        shard.write_bytes(bytes(data))
    return cfg, 300, "tokens-00000.array_record does not match its checksum", False


def _cached_bpe_garbage(t, b):
    _jsonl(t / "d.jsonl", SCENES[:4])
    cfg = dict(source=f"jsonl:{t}/d.jsonl", tokenizer="bpe", vocab_size=300)
    cfg["cache_dir"] = str(t.parent / "cache")
    make_pipeline(_config(cfg))
    for tok in (t.parent / "cache" / "tokenizers").glob("*.json"):
        tok.write_text("{}")
    return cfg, 300, "cached BPE tokenizer", False


CASES = [
    _text_missing,
    _text_empty,
    _jsonl_missing,
    _jsonl_empty,
    _jsonl_blank_lines,
    _jsonl_without_field,
    _jsonl_malformed,
    _jsonl_not_a_string,
    _jsonl_not_utf8,
    _text_binary,
    _text_not_utf8,
    _text_too_small,
    _arrayrecord_corrupt,
    _tokens_without_store,
    _tokens_interrupted,
    _tokens_meta_garbage,
    _tokens_meta_not_a_store,
    _tokens_shard_truncated,
    _tokens_shard_missing,
    _tokens_tokenizer_corrupt,
    _tokens_other_tokenizer,
    _tokens_val_other_tokenizer,
    _tokens_vocab_over_model,
    _tokenizer_missing,
    _tokenizer_json_garbage,
    _tokenizer_model_garbage,
    _vocab_byte_over_model,
    _vocab_bpe_over_model,
    _vocab_file_over_model,
    _corpus_over_bound,
    _cached_meta_garbage,
    _cached_shard_garbage,
    _cached_bpe_garbage,
]


def _config(kwargs):
    base = dict(tokenizer="byte", seq_len=31, global_batch=4, val_fraction=0.25)
    return DataConfig(**{**base, **kwargs})


def _fix_named(message):
    words = ("set ", "delete", "rerun", "rewrite", "re-tokenise", "point ", "narrow", "name ")
    words += ("pre-tokenise", "give ", "fix ", "convert", "check ", "remove", "write ")
    return any(w in message for w in words)


def test_there_are_at_least_the_issues_seventeen_cases():
    assert len(CASES) >= 17


@pytest.mark.parametrize("case", CASES, ids=[f.__name__[1:] for f in CASES])
def test_bad_input_is_one_line_naming_the_path_and_the_fix(case, tmp_path, bpe):
    root = tmp_path / "in"
    root.mkdir()
    kwargs, model_vocab, names, cheap = case(root, bpe)
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    cfg = _config(kwargs)
    before = _tree(root)
    cache = pathlib.Path(cfg.cache_dir)
    cache_before = _tree(cache) if cache.exists() else None
    if cheap:
        with pytest.raises(ValueError) as e:
            validate(cfg, model_vocab_size=model_vocab, max_seq_len=64)
        assert _tree(root) == before
        assert (_tree(cache) if cache.exists() else None) == cache_before  # nothing written
    with pytest.raises(ValueError) as e:
        make_pipeline(cfg, model_vocab_size=model_vocab, max_seq_len=64)
    message = str(e.value)
    assert "\n" not in message and names in message, message
    assert _fix_named(message), message
    assert _tree(root) == before  # the inputs untouched; only the cache may change
    if cheap:
        assert (_tree(cache) if cache.exists() else None) == cache_before


def test_the_vocabulary_is_checked_before_any_tokenising(tmp_path, bpe, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("read or tokenised the corpus")

    for name in ("JsonLines", "TextFiles"):
        monkeypatch.setattr(sources, name, never)
    monkeypatch.setattr(build, "write_shard", never)
    _jsonl(tmp_path / "d.jsonl", SCENES[:4])
    cfg = _config(dict(source=f"jsonl:{tmp_path}/d.jsonl", tokenizer=str(bpe)))
    with pytest.raises(ValueError, match=r"a vocabulary of 600 tokens, more than model\.vocab"):
        make_pipeline(cfg, model_vocab_size=512)
    big = _config(dict(source=f"text:{tmp_path}/*.jsonl", max_tokenize_bytes=1000))
    with pytest.raises(ValueError, match=r"more than data.max_tokenize_bytes=1000"):
        make_pipeline(big, model_vocab_size=512)


@pytest.mark.parametrize("size", [30, 31])
def test_the_window_check_before_tokenising_is_exact_for_bytes(tmp_path, size):
    """Two files of ``size`` bytes, one held out: ``validate`` refuses exactly when a
    split of the tokenised corpus (built here without the checks) has no window of
    seq_len + 1 = 32 ids."""
    for name in "ab":
        (tmp_path / f"{name}.txt").write_text(name * size)
    cfg = _config(dict(source=f"text:{tmp_path}/*.txt", cache_dir=str(tmp_path / "cache")))
    try:
        validate(cfg)
        refused = False
    except ValueError as e:
        assert "holds 31 tokens, fewer than seq_len + 1 = 32" in str(e), e
        refused = True
    _, train_span, val_span, _ = pipeline._spans(cfg)
    counts = [packing.Windows(span, cfg.seq_len).count for span in (train_span, val_span)]
    assert refused == (min(counts) == 0), counts


def test_the_bound_names_the_command_that_pretokenizes_the_same_way(tmp_path):
    _jsonl(tmp_path / "d.jsonl", SCENES[:4], field="body")
    _jsonl(tmp_path / "v.jsonl", SCENES[4:6])
    size = sum(os.path.getsize(tmp_path / f) for f in ("d.jsonl", "v.jsonl"))
    cfg = _config(
        dict(
            source=f"jsonl:{tmp_path}/d.jsonl#body",
            val_split=f"jsonl:{tmp_path}/v.jsonl",
            tokenizer="bpe",
            vocab_size=4096,
            max_tokenize_bytes=size - 1,
        )
    )
    with pytest.raises(ValueError) as e:
        validate(cfg)
    assert (
        f"--source 'jsonl:{tmp_path}/d.jsonl#body' --tokenizer bpe --vocab_size 4096 --workers 8"
        " --out DIR (and the same for the validation data, --out VAL_DIR)" in str(e.value)
    )
    assert "set data.source=tokens:DIR and data.val_split=tokens:VAL_DIR" in str(e.value)
    checked = validate(dataclasses.replace(cfg, max_tokenize_bytes=size))
    assert checked.text_bytes == size and checked.vocab_size == 4096


def test_shakespeare_and_a_store_pass_the_checks(tmp_path):
    checked = validate(DataConfig(), model_vocab_size=1024, max_seq_len=256)
    plays = sum(len(s.encode()) for s in SCENES)
    assert checked.text_bytes == plays < DataConfig().max_tokenize_bytes
    _store(tmp_path / "s")
    checked = validate(DataConfig(source=f"tokens:{tmp_path}/s", tokenizer="byte"))
    assert checked.store_tokens == sum(len(s.encode()) + 1 for s in SCENES[:6])
    assert checked.vocab_size == 257
