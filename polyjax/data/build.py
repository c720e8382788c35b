"""Building a token store: the corpus tokenised shard by shard, in parallel worker
processes, resumably. The command is `python -m polyjax.data.pretokenize`; the trainer's
cache uses `build_store` in-process.

Shard k of the store holds documents [k D, (k+1) D) of the corpus (D = shard_docs), so the
store depends only on the corpus and the tokenizer, not on the worker count or on
interruptions: a run killed and rerun writes the same bytes as one uninterrupted run.
Worker process w of W writes the shards k with k % W == w. The store is built in a
directory beside it (OUT.partial): each shard is written under a temporary name, flushed and
renamed, then recorded as done (tokens-NNNNN.done.json: its counts and sha256); a rerun with
the same inputs keeps the done shards and writes the rest. At the end meta.json is written,
the bookkeeping removed and OUT.partial renamed OUT."""

from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
import queue
import shutil
import socket
import sys
import time

from polyjax.data import store, tokenizers
from polyjax.data.config import one_line

SHARD_DOCS = 16384  # documents per shard: about 30 MB of web text
BATCH_DOCS = 64  # documents tokenised at a time (one progress report)
PLAN = "plan.json"
LOCK = "lock.json"


def num_shards(num_documents: int, shard_docs: int) -> int:
    return -(-num_documents // shard_docs)


def _done_path(partial: pathlib.Path, k: int) -> pathlib.Path:
    return partial / f"tokens-{k:05d}.done.json"


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host runs (a zombie, killed but not reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _dead_temp(path: pathlib.Path) -> bool:
    """A temporary file left by a process of this host that is no longer running."""
    host, _, pid = path.name.rpartition(".tmp-")[2].rpartition("-")
    return host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))


# --- one shard ---------------------------------------------------------------------------


def write_shard(docs, tok, partial: pathlib.Path, k: int, plan: dict, report) -> dict:
    """Tokenises documents [k D, (k+1) D) into shard k of `partial` (temporary name, flushed,
    renamed) and records it as done; calls report(documents, tokens, text bytes) per batch."""
    shard_docs = plan["shard_docs"]
    lo, hi = k * shard_docs, min((k + 1) * shard_docs, plan["documents"])
    final = partial / store.shard_name(k)
    tmp = store.temp_name(final)
    writer = store.ShardWriter(
        tmp, vocab_size=tok.vocab_size, eos_id=tok.eos_id, chunk_tokens=plan["chunk_tokens"]
    )
    text_bytes = 0
    for start in range(lo, hi, BATCH_DOCS):
        texts = [docs[i] for i in range(start, min(start + BATCH_DOCS, hi))]
        tokens_before = writer.counts["tokens"]
        for ids in tok.encode_batch(texts):
            writer.add(ids)
        size = sum(len(t.encode("utf-8")) for t in texts)
        text_bytes += size
        report(len(texts), writer.counts["tokens"] - tokens_before, size)
    info = {**writer.close(), "text_bytes": text_bytes}
    os.replace(tmp, final)
    entry = {"file": final.name, "index": k, "first_document": lo, **info}
    store.write_json_atomic(_done_path(partial, k), entry)
    return entry


def _read_done(partial: pathlib.Path, k: int, plan: dict) -> dict | None:
    """Shard k's done record if the shard is finished and intact at its recorded size."""
    path = _done_path(partial, k)
    try:
        entry = json.loads(path.read_text())
        size = (partial / entry["file"]).stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return None
    first = k * plan["shard_docs"]
    expected_docs = min(plan["shard_docs"], plan["documents"] - first)
    if (
        entry.get("index") != k
        or entry.get("first_document") != first
        or entry.get("documents") != expected_docs
        or size != entry.get("bytes")
    ):
        return None
    return entry


# --- workers -----------------------------------------------------------------------------


def _worker(open_docs, tok_kind, tok_file, partial, plan, shards, out_queue, parent_pid):
    """A worker process: writes `shards` in order, reporting progress on `out_queue`; exits
    when its parent is gone (a killed run), removing its temporary file."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    partial = pathlib.Path(partial)

    def report(docs, tokens, size):
        if os.getppid() != parent_pid:
            for tmp in partial.glob(f"*.tmp-{socket.gethostname()}-{os.getpid()}"):
                tmp.unlink(missing_ok=True)
            os._exit(1)
        out_queue.put(("progress", docs, tokens, size))

    try:
        tok = tokenizers.load_saved(
            tok_kind, partial / tok_file if tok_file else None, fix="rerun pretokenize"
        )
        docs = open_docs()
        for k in shards:
            write_shard(docs, tok, partial, k, plan, report)
            out_queue.put(("shard", k))
    except ValueError as e:
        out_queue.put(("error", one_line(e)))
        return
    except Exception as e:
        out_queue.put(("error", f"{type(e).__name__}: {one_line(e)}"))
        return
    out_queue.put(("finished",))


class Progress:
    """Counts and rate; a line on `log` every `every` seconds and at the end."""

    def __init__(self, total_docs, total_shards, done_docs, done_shards, log, every):
        self.total_docs, self.total_shards = total_docs, total_shards
        self.docs, self.shards = done_docs, done_shards
        self.tokens = self.bytes = 0
        self.start_docs = done_docs
        self.log, self.every = log, every
        self.start = self.last = time.perf_counter()

    def add(self, docs=0, tokens=0, size=0, shards=0):
        self.docs += docs
        self.tokens += tokens
        self.bytes += size
        self.shards += shards
        if time.perf_counter() - self.last >= self.every:
            self.print()

    def print(self, final: bool = False) -> None:
        now = time.perf_counter()
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        done = self.docs - self.start_docs
        remaining = self.total_docs - self.docs
        eta = remaining * elapsed / done if done else float("nan")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
        print(
            f"pretokenize: shards {self.shards}/{self.total_shards}, documents "
            f"{self.docs:,}/{self.total_docs:,} ({100 * self.docs / max(self.total_docs, 1):.1f}%)"
            f", this run {self.tokens:,} tokens from {self.bytes / 1e6:,.1f} MB of text, "
            f"{self.tokens / elapsed:,.0f} tokens/s, {self.bytes / 1e6 / elapsed:,.2f} MB/s, "
            + (f"{elapsed:.1f} s" if final else f"ETA {eta_text}"),
            file=self.log,
            flush=True,
        )


def _run_workers(open_docs, tok, partial, plan, todo, workers, progress):
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    info = plan["tokenizer"]
    procs = []
    for w in range(workers):
        shards = [k for k in todo if k % workers == w]
        if shards:
            args = (open_docs, info["kind"], info["file"], str(partial), plan, shards, q)
            procs.append(ctx.Process(target=_worker, args=(*args, os.getpid()), daemon=True))
    for p in procs:
        p.start()
    running = len(procs)
    try:
        while running:
            try:
                msg = q.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and q.empty():
                    raise RuntimeError(
                        f"a pretokenize worker died (exit code {dead[0].exitcode}); rerun the "
                        "same command to resume"
                    ) from None
                continue
            if msg[0] == "progress":
                progress.add(*msg[1:])
            elif msg[0] == "shard":
                progress.add(shards=1)
            elif msg[0] == "error":
                raise ValueError(msg[1])
            else:
                running -= 1
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()


# --- the store ---------------------------------------------------------------------------


def make_plan(docs, tok, *, spec, split, shard_docs, chunk_tokens, tokenizer_arg) -> dict:
    """What the store is made of; a rerun must have the same plan to resume."""
    return {
        "source": spec,
        "split": split,
        "source_fingerprint": docs.fingerprint,
        "documents": len(docs),
        "shard_docs": shard_docs,
        "chunk_tokens": chunk_tokens,
        "tokenizer_arg": tokenizer_arg,
        "tokenizer_fingerprint": tok.fingerprint,
    }


def _start_partial(partial: pathlib.Path, tok, plan: dict) -> dict:
    """Creates `partial` with the tokenizer and the plan (atomically, by renaming a
    temporary directory), or checks an existing one's plan; returns the plan as stored."""
    if not (partial / PLAN).is_file():
        init = store.temp_name(partial)
        shutil.rmtree(init, ignore_errors=True)
        init.mkdir(parents=True)
        file = tok.save(init)
        stored = {**plan, "tokenizer": {"kind": tok.kind, "file": file}}
        store.write_json_atomic(init / PLAN, stored)
        shutil.rmtree(partial, ignore_errors=True)  # a directory left without a plan
        os.rename(init, partial)
        return stored
    try:
        stored = json.loads((partial / PLAN).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{partial / PLAN} is unreadable ({one_line(e)}); delete {partial} and rerun"
        ) from None
    differ = sorted(k for k in plan if stored.get(k) != plan[k])
    if differ:
        raise ValueError(
            f"{partial} was started with other inputs ({', '.join(differ)} differ: "
            f"{[stored.get(k) for k in differ]} then, {[plan[k] for k in differ]} now); rerun "
            f"the command that started it, or delete {partial} to start over"
        )
    return stored


def _check_finished(partial: pathlib.Path, plan: dict) -> None:
    """A finished build (meta.json written, not yet renamed) must be of the same inputs."""
    meta = store.read_meta(partial, f"delete {partial} and rerun")
    fingerprint = f"{plan['tokenizer_fingerprint']}-{plan['source_fingerprint']}"
    if (meta["fingerprint"], meta.get("shard_docs"), meta["chunk_tokens"]) != (
        fingerprint,
        plan["shard_docs"],
        plan["chunk_tokens"],
    ):
        raise ValueError(
            f"{partial} holds a finished store of other inputs; rerun the command that "
            f"started it, or delete {partial} to start over"
        )


def _lock(partial: pathlib.Path) -> None:
    """Takes partial/lock.json (host, pid), refusing if a live process holds it."""
    path = partial / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        held = json.loads(path.read_text())
    except (OSError, ValueError):
        held = None
    if (
        isinstance(held, dict)
        and held != me
        and (held.get("host") != me["host"] or _pid_alive(int(held.get("pid", -1))))
    ):
        raise ValueError(
            f"{partial} is being written by pid {held.get('pid')} on {held.get('host')}; wait "
            f"for it, or if that run is dead delete {path}"
        )
    store.write_json_atomic(path, me)


def _finish(partial: pathlib.Path, out: pathlib.Path, plan: dict, entries: list[dict], info):
    """meta.json from the shards' done records; then the bookkeeping files go and
    `partial` becomes `out`."""
    text_tokens = sum(e["text_tokens"] for e in entries)
    if text_tokens == 0:
        shutil.rmtree(partial)
        raise ValueError(
            f"the corpus {plan['source']} is empty: its {plan['documents']} documents hold no "
            "text; point the source at files with text"
        )
    vocab, eos = info["vocab_size"], info["eos_id"]
    keys = ("file", "documents", "tokens", "records", "bytes", "sha256")
    meta = {
        "format": store.FORMAT,
        "dtype": store.token_dtype(vocab).name,
        "chunk_tokens": plan["chunk_tokens"],
        "shard_docs": plan["shard_docs"],
        "num_tokens": sum(e["tokens"] for e in entries),
        "num_documents": sum(e["documents"] for e in entries),
        "text_bytes": sum(e["text_bytes"] for e in entries),
        "vocab_size": vocab,
        "eos_id": eos,
        "tokenizer": plan["tokenizer"],
        "shards": [{k: e[k] for k in keys} for e in entries],
        "fingerprint": f"{plan['tokenizer_fingerprint']}-{plan['source_fingerprint']}",
        "source": plan["source"],
        "split": plan["split"],
    }
    store.write_json_atomic(partial / "meta.json", meta)
    _clean(partial)
    os.rename(partial, out)


def _clean(directory: pathlib.Path, *, finished: bool = True) -> None:
    """Removes temporaries of dead processes, or once `finished` (no writer of the build is
    left) all temporaries and the plan, the lock and the done records."""
    for path in directory.iterdir():
        name = path.name
        if (".tmp-" in name and (finished or _dead_temp(path))) or (
            finished and (name in (PLAN, LOCK) or name.endswith(".done.json"))
        ):
            path.unlink(missing_ok=True)


def build_store(
    docs,
    tok,
    out: str | os.PathLike,
    *,
    spec: str,
    split: str = "train",
    tokenizer_arg: str = "",
    open_docs=None,
    workers: int = 1,
    shard_docs: int = SHARD_DOCS,
    chunk_tokens: int = store.CHUNK_TOKENS,
    partial: pathlib.Path | None = None,
    log=None,
    progress_every: float = 5.0,
) -> store.TokenStore:
    """Writes the store of `docs` (a DocumentSource named `spec`) tokenised by `tok` to `out`,
    resuming the build in `partial` (default OUT.partial) if one was interrupted. Workers > 1
    run in spawned processes, each reopening the corpus with `open_docs()` (picklable)."""
    out = pathlib.Path(out)
    log = log or sys.stderr
    if (out / "meta.json").is_file():
        _clean(out)
        return store.TokenStore(out)
    if workers > 1 and open_docs is None:
        raise ValueError("workers > 1 needs open_docs, a picklable function opening the corpus")
    partial = partial or out.with_name(out.name + ".partial")
    plan = make_plan(
        docs,
        tok,
        spec=spec,
        split=split,
        shard_docs=shard_docs,
        chunk_tokens=chunk_tokens,
        tokenizer_arg=tokenizer_arg,
    )
    try:
        if (partial / "meta.json").is_file():  # killed while finishing: only the rename left
            _check_finished(partial, plan)
            _clean(partial)
            os.rename(partial, out)
            return store.TokenStore(out)
        plan = _start_partial(partial, tok, plan)
        _lock(partial)
        _clean(partial, finished=False)
        total = num_shards(plan["documents"], shard_docs)
        entries = {k: e for k in range(total) if (e := _read_done(partial, k, plan))}
        todo = [k for k in range(total) if k not in entries]
        progress = Progress(
            plan["documents"],
            total,
            sum(e["documents"] for e in entries.values()),
            len(entries),
            log,
            progress_every,
        )
        if entries:
            print(
                f"pretokenize: resuming {partial}: {len(entries)}/{total} shards already done",
                file=log,
                flush=True,
            )
        if workers > 1 and len(todo) > 1:
            _run_workers(open_docs, tok, partial, plan, todo, workers, progress)
        else:
            for k in todo:
                write_shard(docs, tok, partial, k, plan, progress.add)
                progress.add(shards=1)
        progress.print(final=True)
        entries = [_read_done(partial, k, plan) for k in range(total)]
        missing = [k for k, e in enumerate(entries) if e is None]
        if missing:
            raise RuntimeError(f"shards {missing[:5]} of {partial} were not written; rerun")
        _finish(partial, out, plan, entries, {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id})
    except OSError as e:
        if (out / "meta.json").is_file():  # another process finished the same store first
            for tmp in out.glob(f"*.tmp-{socket.gethostname()}-{os.getpid()}"):
                tmp.unlink(missing_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            return store.TokenStore(out)
        raise ValueError(
            f"cannot write the token store {out} ({one_line(e)}); make its directory writable "
            "(the trainer's cache: set data.cache_dir or $POLYJAX_CACHE) and check the space"
        ) from None
    return store.TokenStore(out)


def private_partial(out: pathlib.Path) -> pathlib.Path:
    """A build directory for `out` of this process alone (the trainer's cache: processes
    building the same entry do not share one), after removing those of dead processes."""
    for old in out.parent.glob(f"{out.name}.partial-*"):
        host, _, pid = old.name.rpartition(".partial-")[2].rpartition("-")
        if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return out.with_name(f"{out.name}.partial-{socket.gethostname()}-{os.getpid()}")
