"""lm-evaluation-harness over a polyjax checkpoint (``pip install -e ".[eval]"``).

``PolyjaxLM`` is an ``lm_eval.api.model.LM`` (through ``TemplateLM``, which
splits each (context, continuation) into token ids the way the harness's own
models do): ``loglikelihood`` and ``loglikelihood_rolling`` score in batches of
bucketed shapes (``polyjax.evaluate``), ``generate_until`` decodes with the KV
cache (``polyjax.sample``). The end-of-text token conditions an empty context,
as it starts every document in training.

    python launch.py --eval --workdir runs/default --tasks arc_easy,hellaswag
    python launch.py --eval --workdir RUN --tasks paper          # PAPER_TASKS

``main`` writes ``<workdir>/eval/results.json`` (the harness's results, configs
and versions) and ``results.md`` (its table). The tasks' datasets come from the
Hugging Face hub or its local cache; ``include_path`` adds task YAMLs of one's own
(for example over local JSONL files).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
from lm_eval import evaluator
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import make_table

from polyjax import evaluate, sample
from polyjax.data import DataConfig, sources
from polyjax.restore import Run, batch_multiple, load_run

PAPER_TASKS = (
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "piqa",
    "sciq",
    "winogrande",
    "mmlu",
    "boolq",
    "copa",
    "commonsense_qa",
    "openbookqa",
    "social_iqa",
    "coqa",
)
"""The downstream tasks of the paper (Tables 1-3 and appendix D), by their lm-eval names."""


class PolyjaxLM(TemplateLM):
    """A restored polyjax run as an lm-eval model. ``batch_size`` rows per forward
    pass (rounded up to the data-parallel size); ``max_gen_toks`` the default
    generation budget of ``generate_until``; ``seed`` for sampled generations."""

    def __init__(
        self,
        workdir: str | None = None,
        run: Run | None = None,
        batch_size: int = 32,
        max_gen_toks: int = 256,
        seed: int = 0,
    ):
        super().__init__()
        if (workdir is None) == (run is None):
            raise ValueError("PolyjaxLM: pass exactly one of workdir and run")
        self.run = load_run(workdir) if run is None else run
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)

    @property
    def eot_token_id(self) -> int:
        return self.run.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.run.model_config.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return self.run.tokenizer.fingerprint

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list:
        del add_special_tokens, kwargs  # polyjax tokenizers add no special tokens
        return list(self.run.tokenizer.encode(string))

    def tok_decode(self, tokens) -> str:
        return self.run.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = evaluate.loglikelihoods(self.run, pairs, self.batch_size)
        for (key, _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        strings = [req.args[0] for req in requests]
        texts = [self.tok_encode(s) for s in strings]
        results = evaluate.rolling_loglikelihoods(self.run, texts, self.batch_size)
        for s, result in zip(strings, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (s,), result)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``/``temperature``) generations, cut at
        the first of the ``until`` strings, at most ``max_gen_toks`` tokens."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        rows = max(batch_multiple(self.run.mesh), self.batch_size)
        for key, members in groups.items():
            kwargs = dict(json.loads(key))
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eot_text = self.tok_decode([self.eot_token_id])
            if eot_text and eot_text not in until:
                until.append(eot_text)
            budget = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sampling = _sampling(kwargs)
            for lo in range(0, len(members), rows):
                chunk = members[lo : lo + rows]
                contexts = [
                    self.tok_encode(requests[i].args[0]) or [self.eot_token_id] for i in chunk
                ]
                contexts += [contexts[0]] * (rows - len(contexts))  # one compiled shape
                outs = sample.generate(self.run, contexts, budget, sampling, self.seed)
                for i, out in zip(chunk, outs, strict=False):
                    text = self.tok_decode(out)
                    for stop in until:
                        if stop:
                            text = text.split(stop, 1)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results


def _sampling(kwargs: dict[str, Any]) -> sample.Sampling:
    """The harness's generation kwargs as a ``Sampling`` (greedy unless it asks)."""
    temperature = float(kwargs.get("temperature", 0.0) or 0.0)
    if not kwargs.get("do_sample", False) or temperature == 0.0:
        return sample.GREEDY
    return sample.Sampling(
        temperature=temperature,
        top_k=int(kwargs.get("top_k", 0) or 0),
        top_p=float(kwargs.get("top_p", 1.0) or 1.0),
    )


# ----------------------------------------------------------------------------
# Local tasks from the built-in corpus (no hub needed).

LOCAL_TASKS = {
    "shakespeare_next_line": "other_lines",
    "shakespeare_word_order": "shuffled",
}
"""Four-way tasks on the scenes the default data config holds out from training:
which is the true next line of the scene, against three spoken lines of about its
length from elsewhere ("other_lines"), or against three shuffles of its own words
("shuffled")."""

_TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _spoken(line: str) -> bool:
    """A spoken line of four words or more (not a heading, speaker or direction)."""
    return not line.startswith(("#", "**", "_")) and len(line.split()) >= 4


def next_line_items(
    scenes: list[str], n: int, distractors: str, seed: int = 0, context_lines: int = 8
) -> list[dict]:
    """Up to ``n`` four-way items: ``context`` (up to ``context_lines`` lines before a
    spoken line), ``choices`` (that line, without its line break, and three
    distractors, in random order) and ``label`` (the true line's index)."""
    if distractors not in LOCAL_TASKS.values():
        raise ValueError(f"distractors={distractors!r}: valid: {', '.join(LOCAL_TASKS.values())}")
    rng = np.random.default_rng(seed)
    split = [scene.splitlines(keepends=True) for scene in scenes]
    candidates = [
        (s, i) for s, lines in enumerate(split) for i in range(4, len(lines)) if _spoken(lines[i])
    ]
    pool = sorted({split[s][i].rstrip() for s, i in candidates})
    items = []
    for k in rng.permutation(len(candidates)):
        if len(items) == n:
            break
        s, i = candidates[k]
        true = split[s][i].rstrip()
        wrong: list[str] = []
        for _ in range(200):
            if distractors == "shuffled":
                line = " ".join(rng.permutation(true.split(" ")))
            else:
                line = pool[rng.integers(len(pool))]
                if abs(len(line) - len(true)) > 0.2 * len(true) + 2:
                    continue
            if line != true and line not in wrong:
                wrong.append(line)
            if len(wrong) == 3:
                break
        if len(wrong) < 3:
            continue
        order = rng.permutation(4)
        choices = [true, *wrong]
        items.append(
            {
                "context": "".join(split[s][max(0, i - context_lines) : i]),
                "choices": [choices[j] for j in order],
                "label": int(np.argmax(order == 0)),
            }
        )
    return items


def write_local_tasks(folder: str | pathlib.Path, n: int = 500, seed: int = 0) -> list[str]:
    """Write the LOCAL_TASKS (a YAML over a JSONL file each) into ``folder``, on the
    Shakespeare scenes that the default data config holds out. Returns their names."""
    folder = pathlib.Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    _, held_out = sources.hold_out(sources.Shakespeare(), DataConfig().val_fraction)
    scenes = [held_out[i] for i in range(len(held_out))]
    for task, distractors in LOCAL_TASKS.items():
        items = next_line_items(scenes, n, distractors, seed)
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(item) + "\n" for item in items))
        yaml = _TASK_YAML.format(task=task, data=json.dumps(str(data)))
        (folder / f"{task}.yaml").write_text(yaml)
    return list(LOCAL_TASKS)


def parse_tasks(tasks: str | list[str]) -> list[str]:
    """ "a,b" or ["a", "b"] -> task names; "paper" expands to PAPER_TASKS."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for name in (n.strip() for n in names):
        if name == "paper":
            out += PAPER_TASKS
        elif name:
            out.append(name)
    if not out:
        raise ValueError("--tasks: no task given (e.g. --tasks arc_easy,hellaswag or paper)")
    return out


def main(
    workdir: str,
    tasks: str | list[str],
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 32,
    include_path: str | None = None,
    out_dir: str | None = None,
    seed: int = 0,
    lm: PolyjaxLM | None = None,
) -> dict[str, Any]:
    """``launch.py --eval``: evaluate the newest checkpoint of ``workdir`` on
    ``tasks`` and write results.json and results.md (default: ``<workdir>/eval``);
    prints the table and returns the harness's results dict."""
    names = parse_tasks(tasks)
    out = pathlib.Path(out_dir) if out_dir else pathlib.Path(workdir) / "eval"
    paths = [include_path] if include_path else []
    if set(names) & set(LOCAL_TASKS):
        write_local_tasks(out / "tasks", seed=seed)
        paths.append(str(out / "tasks"))
    manager = TaskManager(include_path=paths or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"--tasks: unknown task(s) {', '.join(unknown)} (lm-eval --tasks list shows "
            "the known ones; --include_path adds a folder of task YAMLs)"
        )
    lm = PolyjaxLM(workdir=workdir, batch_size=batch_size, seed=seed) if lm is None else lm
    results = evaluator.simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        fewshot_random_seed=seed,
    )
    out.mkdir(parents=True, exist_ok=True)
    table = make_table(results)
    header = f"# lm-eval: {pathlib.Path(workdir).name}, checkpoint step {lm.run.step}\n\n"
    (out / "results.md").write_text(header + table + "\n")
    record = {
        k: results[k] for k in ("results", "configs", "versions", "n-samples") if k in results
    }
    record["polyjax"] = {"workdir": str(workdir), "step": lm.run.step, "tasks": names}
    (out / "results.json").write_text(json.dumps(record, indent=2, default=str))
    print(header + table, flush=True)
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}", flush=True)
    return results
