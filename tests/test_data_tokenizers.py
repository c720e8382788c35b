"""Tokenizers: exact round trips on Shakespeare and Python's own sources, the trained BPE and
its cache, tokenizer files by path, and bad files."""

import pathlib
import sysconfig

import numpy as np
import pytest

from polyjax.data import sources, tokenizers

SCENES = sources.shakespeare_scenes()
STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
# Real text with non-ASCII: the Shakespeare scenes holding an em dash, and a stdlib module.
SAMPLES = [
    *[s for s in SCENES if not s.isascii()][:2],
    SCENES[400],
    (STDLIB / "json" / "decoder.py").read_text(encoding="utf-8"),
]


class _Docs(list):
    fingerprint = "first-40-scenes"


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    tokenizers.make_tokenizer("bpe", vocab_size=600, corpus=_Docs(SCENES[:40]), cache_dir=cache)
    (path,) = (cache / "tokenizers").iterdir()
    return path


def test_samples_hold_non_ascii_text():
    assert not SAMPLES[0].isascii()


def test_byte_tokenizer_round_trips_and_ends_with_its_own_eos():
    tok = tokenizers.ByteTokenizer()
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
        assert list(tok.encode_batch([text])[0]) == ids
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.decode([*tok.encode("ab"), tok.eos_id]) == "ab"


def test_trained_bpe_round_trips_compresses_and_has_the_asked_vocab(bpe_path):
    tok = tokenizers.HFTokenizer(bpe_path)
    assert tok.vocab_size == 600 and 0 <= tok.eos_id < 600
    for text in SAMPLES:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert max(ids) < 600 and tok.eos_id not in ids
    # Shakespeare-trained merges compress unseen Shakespeare better than Python code.
    ratio = [len(t.encode()) / len(tok.encode(t)) for t in (SCENES[400], SAMPLES[-1])]
    assert ratio[0] > 1.8 and ratio[0] > ratio[1] > 1.0
    assert [list(x) for x in tok.encode_batch(SAMPLES)] == [tok.encode(t) for t in SAMPLES]


def test_eos_text_inside_a_document_is_not_the_eos_id(bpe_path):
    tok = tokenizers.HFTokenizer(bpe_path)
    line = SCENES[0].splitlines()[0] + tokenizers.EOS_TOKEN
    assert tok.eos_id not in tok.encode(line) and tok.decode(tok.encode(line)) == line


def test_bpe_is_cached_by_corpus_and_vocab(bpe_path, monkeypatch):
    cache = bpe_path.parent.parent

    def fail(*a, **k):
        raise AssertionError("retrained")

    monkeypatch.setattr(tokenizers, "train_bpe", fail)
    again = tokenizers.make_tokenizer("bpe", vocab_size=600, corpus=_Docs(), cache_dir=cache)
    assert again.fingerprint == tokenizers.HFTokenizer(bpe_path).fingerprint
    with pytest.raises(AssertionError, match="retrained"):
        tokenizers.make_tokenizer("bpe", vocab_size=700, corpus=_Docs(), cache_dir=cache)


def test_tokenizer_json_and_sentencepiece_by_path(bpe_path, tmp_path):
    import sentencepiece as spm

    hf = tokenizers.make_tokenizer(str(bpe_path), vocab_size=0)
    assert hf.encode(SAMPLES[2]) == tokenizers.HFTokenizer(bpe_path).encode(SAMPLES[2])
    lines = [line for s in SCENES[:20] for line in s.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=512,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        byte_fallback=True,
        minloglevel=2,
    )
    sp = tokenizers.make_tokenizer(str(tmp_path / "sp.model"), vocab_size=0)
    assert (sp.vocab_size, sp.eos_id) == (512, 2)
    for text in SAMPLES:
        assert sp.decode(sp.encode(text)) == text
        assert sp.decode([*sp.encode(text), sp.eos_id]) == text
    np.testing.assert_array_equal(sp.encode_batch(SAMPLES[:2])[1], sp.encode(SAMPLES[1]))


def test_bad_tokenizer_files_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.json does not exist"):
        tokenizers.make_tokenizer(str(tmp_path / "nope.json"), vocab_size=0)
    bad = tmp_path / "bad.model"
    bad.write_bytes(SCENES[0].encode()[:100])
    with pytest.raises(ValueError, match=r"bad\.model"):
        tokenizers.make_tokenizer(str(bad), vocab_size=0)
    bad = tmp_path / "tokenizer.json"
    bad.write_text(SCENES[0][:100])
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        tokenizers.make_tokenizer(str(bad), vocab_size=0)
