"""The pretokenize command: the store depends only on the corpus and the tokenizer (not on the
worker count, not on a SIGKILL and a rerun), refused reruns, and training on a store
resuming bit for bit as on Shakespeare."""

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from polyjax.data import build, pretokenize, sources, store, tokenizers

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCENES = sources.shakespeare_scenes()


class _Docs(list):
    fingerprint = "scenes"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """JSONL corpora of Shakespeare scenes: 400 (2.6 MB) and 40; a BPE-600 tokenizer.json."""
    d = tmp_path_factory.mktemp("corpus")
    for name, scenes in (("scenes", SCENES[:400]), ("few", SCENES[:40])):
        with open(d / f"{name}.jsonl", "w") as f:
            for scene in scenes:
                f.write(json.dumps({"text": scene}) + "\n")
    tokenizers.make_tokenizer("bpe", vocab_size=600, corpus=_Docs(SCENES[:40]), cache_dir=d)
    (bpe,) = (d / "tokenizers").iterdir()
    return d, bpe


def _argv(source, tokenizer, out, workers):
    return [
        *("--source", source, "--tokenizer", str(tokenizer), "--out", str(out)),
        *("--workers", str(workers), "--shard_docs", "10", "--progress_every", "0.2"),
    ]


def _hashes(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


# Runs the command, SIGKILLing its whole process group (the workers too) from the main
# process once KILL_AT shards are done: a kill at a known point without a hook in the code.
KILLED_RUN = """
import os, signal, sys
from polyjax.data import build, pretokenize
add = build.Progress.add
def add_then_kill(self, *args, **kwargs):
    add(self, *args, **kwargs)
    if self.shards >= {kill_at}:
        os.killpg(0, signal.SIGKILL)
build.Progress.add = add_then_kill
sys.exit(pretokenize.main(sys.argv[1:]))
"""


def test_killed_and_resumed_run_writes_the_same_bytes_as_an_uninterrupted_one(corpus, tmp_path):
    d, _ = corpus
    source = f"jsonl:{d}/scenes.jsonl"
    # Reference: one process, uninterrupted.
    assert pretokenize.main(_argv(source, "byte", tmp_path / "ref", 1)) == 0
    ref = _hashes(tmp_path / "ref")
    assert len(ref) == 40 + 1  # 40 shards of 10 documents and meta.json
    # Two worker processes, all SIGKILLed after 10 shards.
    out, partial = tmp_path / "killed", tmp_path / "killed.partial"
    argv = _argv(source, "byte", out, 2)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN.format(kill_at=10), *argv],
        cwd=ROOT,
        start_new_session=True,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done = len(list(partial.glob("*.done.json")))
    assert 10 <= done < 40 and not out.exists()
    # `tokens:` on the unfinished store says how to finish it.
    with pytest.raises(ValueError, match=r"killed\.partial holds an interrupted pretokenize run"):
        store.TokenStore(out)
    # The rerun keeps the finished shards and writes the rest.
    cmd = [sys.executable, "-m", "polyjax.data.pretokenize", *argv]
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    assert f"{done}/40 shards already done" in rerun.stderr
    assert _hashes(out) == ref and not partial.exists()
    # The store reads back as the documents' bytes, each followed by eos.
    s = store.TokenStore(out)
    expected = np.concatenate([[*doc.encode(), 256] for doc in SCENES[:400]])
    np.testing.assert_array_equal(s.read(0, s.num_tokens), expected)
    s.verify()


def test_rerun_with_other_inputs_or_during_a_live_run_is_refused(corpus, tmp_path, capsys):
    d, bpe = corpus
    out = tmp_path / "s"
    partial = tmp_path / "s.partial"
    source = f"jsonl:{d}/few.jsonl"
    docs = sources.open_source(source)
    tok = tokenizers.HFTokenizer(bpe)

    class StopError(Exception):
        pass

    def stop_after_two(shards=[]):  # noqa: B006 (a counter)
        shards.append(1)
        if len(shards) > 2:
            raise StopError

    original = build.write_shard

    def write_then_maybe_stop(*args):
        stop_after_two()
        return original(*args)

    build.write_shard = write_then_maybe_stop
    try:
        with pytest.raises(StopError):
            build.build_store(
                docs,
                tok,
                out,
                spec=source,
                tokenizer_arg=str(bpe),
                shard_docs=10,
            )
    finally:
        build.write_shard = original
    assert len(list(partial.glob("*.done.json"))) == 2
    # Another shard size: refused in one line naming the directory and the fix.
    assert pretokenize.main([*_argv(source, bpe, out, 1)[:-4], "--shard_docs", "20"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "s.partial was started with other inputs (shard_docs differ" in err
    # A lock held by a live process (this one's parent) is refused; a dead one's is taken.
    (partial / "lock.json").write_text(json.dumps({"host": os.uname().nodename, "pid": 1}))
    assert pretokenize.main(_argv(source, bpe, out, 1)) == 2
    assert "is being written by pid 1" in capsys.readouterr().err
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    (partial / "lock.json").write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead)}))
    assert pretokenize.main(_argv(source, bpe, out, 1)) == 0
    assert "resuming" in capsys.readouterr().err
    shards = [store.shard_name(k) for k in range(4)]
    assert sorted(p.name for p in out.iterdir()) == sorted(["meta.json", "tokenizer.json", *shards])
    s = store.TokenStore(out)  # the tokenizer beside the store; the documents it encodes
    assert s.tokenizer().fingerprint == tok.fingerprint
    expected = np.concatenate([[*tok.encode(doc), tok.eos_id] for doc in SCENES[:40]])
    np.testing.assert_array_equal(s.read(0, s.num_tokens), expected)


def test_training_on_a_store_resumes_bitwise(tmp_path, tiny, monkeypatch):
    """A run on a token store, interrupted after its step-2 checkpoint and resumed,
    logs the losses of the uninterrupted run bit for bit, as on Shakespeare
    (tests/test_train.py)."""
    from polyjax import metrics as mx
    from polyjax import train
    from polyjax.data import pipeline

    d = tmp_path / "corpus"
    d.mkdir()
    with open(d / "scenes.jsonl", "w") as f:
        for scene in SCENES[:60]:
            f.write(json.dumps({"text": scene}) + "\n")
    out = tmp_path / "store"
    argv = ["--source", f"jsonl:{d}/scenes.jsonl", "--tokenizer", "byte", "--out", str(out)]
    assert pretokenize.main([*argv, "--shard_docs", "7"]) == 0
    assert len(store.TokenStore(out).paths) == 9  # 60 documents, 7 a shard
    run = {"data.source": f"tokens:{out}", "train.steps": 4, "train.checkpoint_every": 2}
    spec = tiny.spec(**run)
    train.train(spec, tmp_path / "full")
    real = pipeline.TrainIterator.__next__

    def interrupted(self):
        if self.get_state()["next_batch"] == 3:  # after the checkpoint at 2 and one more step
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(pipeline.TrainIterator, "__next__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.train(spec, tmp_path / "resumed")
    monkeypatch.undo()
    train.train(spec, tmp_path / "resumed")
    losses = lambda w: [(r["step"], r["loss"]) for r in mx.read_jsonl(w / mx.JSONL)]
    assert [s for s, _ in losses(tmp_path / "full")] == [1, 2, 3, 4]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")  # bitwise


def test_a_run_killed_between_meta_json_and_the_rename_is_finished_by_the_rerun(
    tmp_path, monkeypatch
):
    docs, tok = _Docs(SCENES[:9]), tokenizers.ByteTokenizer()
    build.build_store(docs, tok, tmp_path / "ref", spec="s", shard_docs=4)
    rename = os.rename

    def killed(src, dst):
        if str(src).endswith("out.partial"):
            raise KeyboardInterrupt  # the process dies here
        rename(src, dst)

    monkeypatch.setattr(build.os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        build.build_store(docs, tok, tmp_path / "out", spec="s", shard_docs=4)
    monkeypatch.undo()
    partial = tmp_path / "out.partial"
    assert sorted(p.name for p in partial.iterdir())[0] == "meta.json"  # bookkeeping gone
    with pytest.raises(ValueError, match=r"out\.partial holds a finished store of other inputs"):
        build.build_store(docs, tok, tmp_path / "out", spec="s", shard_docs=3)
    build.build_store(docs, tok, tmp_path / "out", spec="s", shard_docs=4)
    assert _hashes(tmp_path / "out") == _hashes(tmp_path / "ref") and not partial.exists()


def test_a_bad_document_in_a_worker_is_one_line_and_exit_2(tmp_path, capsys):
    lines = [json.dumps({"text": s}) for s in SCENES[:30]]
    lines[25] = '{"text": "unterminated'
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    argv = _argv(f"jsonl:{tmp_path}/d.jsonl", "byte", tmp_path / "s", 2)
    assert pretokenize.main(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    offset = sum(len(line) + 1 for line in lines[:25])
    assert err.startswith(f"error: jsonl source: {tmp_path}/d.jsonl at byte {offset} is not a")
    assert not (tmp_path / "s").exists()  # shard 2 failed; shard 0 (and 1) kept for a rerun
    assert (tmp_path / "s.partial" / "tokens-00000.done.json").is_file()
