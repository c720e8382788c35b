"""The training stream: determinism, resume, per-process shares, packing, segments, the
validation split and the unigram baseline, checked against the documents themselves."""

import json

import numpy as np
import pytest

from polyjax.data import DataConfig, make_pipeline, packing, sources
from polyjax.data.tokenizers import ByteTokenizer

SCENES = sources.shakespeare_scenes()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL corpus of the first 12 Shakespeare scenes (about 90 KB)."""
    d = tmp_path_factory.mktemp("corpus")
    with open(d / "scenes.jsonl", "w") as f:
        for scene in SCENES[:12]:
            f.write(json.dumps({"text": scene}) + "\n")
    return d


def _cfg(corpus, **kw):
    base = dict(
        source=f"jsonl:{corpus}/*.jsonl",
        tokenizer="byte",
        seq_len=127,
        global_batch=16,
        val_fraction=0.2,
        cache_dir=str(corpus / "cache"),
    )
    return DataConfig(**{**base, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_batches_follow_the_contract(corpus):
    p = make_pipeline(_cfg(corpus))
    b = next(p.train_iter())
    assert set(b) == {"inputs", "targets", "segment_ids", "positions", "weights"}
    for k, v in b.items():
        assert v.shape == (16, 127)
        assert v.dtype == (np.float32 if k == "weights" else np.int32)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    np.testing.assert_array_equal(b["weights"], 1.0)
    np.testing.assert_array_equal(b["segment_ids"], 1)  # document_boundaries=False
    np.testing.assert_array_equal(b["positions"], np.broadcast_to(np.arange(127), (16, 127)))


def test_same_seed_same_batches_other_seed_other_order(corpus):
    a = _take(make_pipeline(_cfg(corpus)).train_iter(), 4)
    b = _take(make_pipeline(_cfg(corpus)).train_iter(), 4)
    c = _take(make_pipeline(_cfg(corpus, seed=1)).train_iter(), 4)
    assert _same(a, b)
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])


def test_epochs_cover_every_window_once_and_reshuffle(corpus):
    p = make_pipeline(_cfg(corpus))
    n = p.train.count
    rows = np.concatenate([b["inputs"] for b in _take(p.train_iter(), 2 * n // 16 + 1)])
    all_windows = np.stack([p.train[k][:-1] for k in range(n)])
    epoch0, epoch1 = rows[:n], rows[n : 2 * n]
    key = lambda a: sorted(map(bytes, a.astype(np.int32)))
    assert key(epoch0) == key(all_windows) == key(epoch1)
    assert not np.array_equal(epoch0, epoch1)


@pytest.mark.parametrize("threads", [0, 2])
def test_resume_mid_epoch_and_across_epochs_gives_the_next_batches(corpus, threads):
    cfg = _cfg(corpus, read_threads=threads, document_boundaries=True)
    epoch_batches = make_pipeline(cfg).train.count / 16
    steps = int(epoch_batches) + 3  # past the first epoch boundary
    full = _take(make_pipeline(cfg).train_iter(), steps + 4)
    for stop in (3, int(epoch_batches), steps):  # mid-epoch, at/around the boundary, after
        it = make_pipeline(cfg).train_iter()
        _take(it, stop)
        state = json.loads(json.dumps(it.get_state()))
        resumed = make_pipeline(cfg).train_iter()
        resumed.set_state(state)
        assert _same(_take(resumed, 4), full[stop : stop + 4])
    assert _same(
        full, _take(make_pipeline(_cfg(corpus, document_boundaries=True)).train_iter(), steps + 4)
    )


def test_resume_refuses_a_state_of_another_stream(corpus):
    it = make_pipeline(_cfg(corpus)).train_iter()
    next(it)
    other = make_pipeline(_cfg(corpus, seq_len=63)).train_iter()
    with pytest.raises(ValueError, match=r"\['seq_len'\] differ"):
        other.set_state(it.get_state())


def test_resume_under_another_global_batch_reads_the_next_windows(corpus):
    """A state saved under batch 16 after 80 windows resumes under 8 (80 is a multiple)
    and 24 (it is not: an offset of 8), and on 2 processes, at the same stream position:
    the rows read next are the uninterrupted stream's next rows; the state saved then
    resumes under 16 again."""
    rows = lambda batches: np.concatenate([b["inputs"] for b in batches])
    stream = rows(_take(make_pipeline(_cfg(corpus)).train_iter(), 12))  # 192 windows
    it = make_pipeline(_cfg(corpus)).train_iter()
    _take(it, 5)  # 80 windows read
    saved = json.loads(json.dumps(it.get_state()))
    for batch in (8, 24):
        resumed = make_pipeline(_cfg(corpus, global_batch=batch)).train_iter()
        resumed.set_state(saved)
        np.testing.assert_array_equal(rows(_take(resumed, 2)), stream[80 : 80 + 2 * batch])
        again = make_pipeline(_cfg(corpus)).train_iter()  # and back to batch 16
        again.set_state(json.loads(json.dumps(resumed.get_state())))
        at = 80 + 2 * batch
        np.testing.assert_array_equal(rows(_take(again, 2)), stream[at : at + 32])
    shares = []
    for p in range(2):
        cfg = _cfg(corpus, global_batch=24)
        share = make_pipeline(cfg, process_index=p, process_count=2).train_iter()
        share.set_state(saved)
        shares.append(next(share)["inputs"])
    rebuilt = np.empty((24, shares[0].shape[1]), shares[0].dtype)
    rebuilt[0::2], rebuilt[1::2] = shares  # process p holds global rows p, p + 2, ...
    np.testing.assert_array_equal(rebuilt, stream[80:104])


@pytest.mark.parametrize("count", [2, 4])
def test_process_shares_are_disjoint_cover_the_global_batch_and_read_only_their_rows(
    corpus, count, monkeypatch
):
    single = _take(make_pipeline(_cfg(corpus)).train_iter(), 3)
    reads = {}
    original = packing.Windows.__getitem__

    def counting(self, k):
        reads[current] = reads.get(current, 0) + 1
        return original(self, k)

    monkeypatch.setattr(packing.Windows, "__getitem__", counting)
    shares = []
    for current in range(count):
        shares.append(
            _take(
                make_pipeline(
                    _cfg(corpus), process_index=current, process_count=count
                ).train_iter(),
                3,
            )
        )
    assert reads == {p: 3 * 16 // count for p in range(count)}  # only its own rows
    for b in range(3):
        for k in single[b]:
            rebuilt = np.empty_like(single[b][k])
            for p in range(count):
                assert shares[p][b][k].shape[0] == 16 // count
                rebuilt[p::count] = shares[p][b][k]  # rows p, p+P, ...: disjoint, covering
            np.testing.assert_array_equal(rebuilt, single[b][k])
    # A state saved by one process resumes on P processes at the same global batch.
    state = make_pipeline(_cfg(corpus)).train_iter()
    next(state)
    for p in range(count):
        it = make_pipeline(_cfg(corpus), process_index=p, process_count=count).train_iter()
        it.set_state(state.get_state())
        np.testing.assert_array_equal(next(it)["inputs"], single[1]["inputs"][p::count])


def test_packing_keeps_every_token_once_in_full_windows(corpus):
    p = make_pipeline(_cfg(corpus))
    train_docs, _ = sources.hold_out(sources.JsonLines(f"{corpus}/*.jsonl"), 0.2)
    tok = ByteTokenizer()
    stream = np.concatenate(
        [[*tok.encode(train_docs[i]), tok.eos_id] for i in range(len(train_docs))]
    )
    windows = np.stack([p.train[k] for k in range(p.train.count)])
    assert windows.shape == (p.train.count, 128)
    assert 0 <= len(stream) - windows.size < 128  # only a tail shorter than one window is left
    np.testing.assert_array_equal(windows.ravel(), stream[: windows.size])


def test_segments_and_positions_restart_after_each_eos():
    e = 9
    windows = np.array([[5, 6, e, 7, e, 8, 4, 4, 3], [e, 1, 2, 3, 4, 5, e, e, 1]])
    b = packing.make_batch(windows, eos_id=e, document_boundaries=True)
    np.testing.assert_array_equal(
        b["segment_ids"], [[1, 1, 1, 2, 2, 3, 3, 3], [1, 2, 2, 2, 2, 2, 2, 3]]
    )
    np.testing.assert_array_equal(
        b["positions"], [[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 1, 2, 3, 4, 5, 0]]
    )
    np.testing.assert_array_equal(b["targets"], windows[:, 1:])


def test_segments_in_real_batches_match_a_loop(corpus):
    p = make_pipeline(_cfg(corpus, seq_len=1023, global_batch=4, document_boundaries=True))
    batches = _take(p.train_iter(), 8)
    b = {k: np.concatenate([x[k] for x in batches]) for k in batches[0]}
    eos = p.tokenizer.eos_id
    assert (b["inputs"] == eos).sum() >= 2  # some windows do cross documents
    for row, seg, pos in zip(b["inputs"], b["segment_ids"], b["positions"], strict=True):
        s, q = 1, 0
        for i, t in enumerate(row):
            assert (seg[i], pos[i]) == (s, q)
            s, q = (s + 1, 0) if t == eos else (s, q + 1)


def test_validation_documents_are_held_out_from_training(corpus):
    src = sources.JsonLines(f"{corpus}/*.jsonl")
    train, val = sources.hold_out(src, 0.2)
    assert len(val) == round(0.2 * len(src)) and len(train) + len(val) == len(src)
    docs = sorted([train[i] for i in range(len(train))] + [val[i] for i in range(len(val))])
    assert docs == sorted(SCENES[:12])
    assert not {train[i] for i in range(len(train))} & {val[i] for i in range(len(val))}
    p = make_pipeline(_cfg(corpus))
    val_text = ByteTokenizer().decode(p.val.span.read(0, len(p.val.span)).tolist())
    assert val_text == "".join(val[i] for i in range(len(val)))


def test_eval_batches_are_fixed_and_pad_with_zero_weight(corpus):
    p = make_pipeline(_cfg(corpus))
    full = p.val.count // 16
    batches = p.eval_batches(100)
    assert len(batches) == -(-p.val.count // 16)
    assert _same(batches, p.eval_batches(100)) and _same(batches[:2], p.eval_batches(2))
    w = np.concatenate([b["weights"][:, 0] for b in batches])
    assert w.sum() == p.val.count and (w[: p.val.count] == 1).all()
    np.testing.assert_array_equal(batches[0]["inputs"][3], p.val[3][:-1])
    halves = [
        make_pipeline(_cfg(corpus), process_index=i, process_count=2).eval_batches(full)
        for i in (0, 1)
    ]
    np.testing.assert_array_equal(halves[1][-1]["inputs"], batches[full - 1]["inputs"][1::2])


def test_unigram_loss_matches_counting_the_documents(corpus):
    p = make_pipeline(_cfg(corpus))
    train, _ = sources.hold_out(sources.JsonLines(f"{corpus}/*.jsonl"), 0.2)
    counts = np.ones(257)
    for i in range(len(train)):
        for byte in train[i].encode():
            counts[byte] += 1
    counts[256] += len(train)
    logp = np.log(counts / counts.sum())
    batches = p.eval_batches(1000)
    nll = sum((-logp[b["targets"]] * b["weights"]).sum() for b in batches)
    expected = nll / sum(b["weights"].sum() for b in batches)
    assert p.unigram_loss() == pytest.approx(expected, rel=1e-9)
    assert 2.0 < p.unigram_loss() < np.log(257)  # English bytes: well below uniform


def test_default_config_trains_bpe_on_shakespeare_and_reuses_it(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), seq_len=64, global_batch=8)
    p = make_pipeline(cfg, max_seq_len=128)
    assert p.tokenizer.vocab_size == 1024
    assert p.train.count * 65 > 1_900_000  # 5 MB of text in ~2.1M BPE-1024 tokens
    assert 4.0 < p.unigram_loss() < np.log(1024)
    (bpe,) = (tmp_path / "tokenizers").iterdir()
    mtime = bpe.stat().st_mtime_ns
    again = make_pipeline(cfg)
    assert (
        bpe.stat().st_mtime_ns == mtime and again.tokenizer.fingerprint == p.tokenizer.fingerprint
    )
    assert _same(_take(p.train_iter(), 2), _take(again.train_iter(), 2))
