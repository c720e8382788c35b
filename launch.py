"""polyjax's command line: train a config, a sweep, a dry run, or a study of the paper.

    python launch.py                                   # the main job (configs/default.py)
    python launch.py --config configs/dense.py:act=polyrelu,size=small --config.optim.lr=1e-3
    python launch.py --config configs/dense.py --sweep model.activation.order=1,2,3,4
    python launch.py --config configs/moe.py:size=1b --dry_run
    python launch.py --experiment order --size cpu --seeds 0,1,2   # a study (experiments/)
    srun python launch.py ...                          # multi-host: SLURM, mpirun, TPU VMs
    python launch.py ... --coordinator 10.0.0.1:1234 --num_processes 2 --process_id 0
    python launch.py --sample --workdir runs/default --prompt "ROMEO:" --max_new_tokens 200
    python launch.py --eval --workdir runs/default --tasks arc_easy,hellaswag   # needs .[eval]

Flags are absl's; ``--config path.py[:arg]`` and its typed overrides
``--config.<field>=<value>`` are ml_collections' ``config_flags``. Bad input (an
unknown flag or field, a value of the wrong type or range, an unknown activation,
an impossible mesh, missing or unreadable data, a tokenizer larger than the model's
vocabulary, a workdir in use by another run or holding another config's checkpoints
or only damaged ones) is one line on stderr and exit status 2, before anything
compiles or is written. SIGTERM/SIGINT: the run saves a checkpoint at the step it
stopped, prints the command that resumes it and exits with 143/130. Non-finite
values that stop the run (``train.nonfinite``): a report on stderr and exit status
3. A checkpoint that cannot be saved (read-only or full disk): one line naming the
path and the cause, exit status 4; the checkpoints before it are intact.

Each mode is a function of the parsed flags that returns the exit status
(``MODES``, by the flag that selects it); without a mode flag, ``train_mode``.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import logging
import pathlib
import re
import shlex
import sys
import warnings
from collections.abc import Sequence

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from experiments import run as experiments
from polyjax import aot, cluster, memory, nonfinite, train
from polyjax import checkpoint as ckpt
from polyjax import metrics as mx
from polyjax import sharding as shd
from polyjax import workdir as wd
from polyjax.config import InputError, Spec
from polyjax.model import flops_per_token, param_counts

DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parent / "configs" / "default.py")
USAGE_EXIT, NONFINITE_EXIT, SAVE_EXIT = 2, 3, 4

# The command line config_flags reads the --config.<field> overrides from: set by
# ``parse_flags`` before each parse (it would read sys.argv otherwise).
_PARSED_ARGV: list[str] = []
# The command line as given (``run``, ``app.run``): the one a preempted run prints.
_COMMAND: list[str] = []

CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "path.py[:arg]", lock_config=True, sys_argv=_PARSED_ARGV
)
WORKDIR = flags.DEFINE_string("workdir", None, "where a run writes; default runs/<config name>")
SWEEP = flags.DEFINE_multi_string(
    "sweep",
    [],
    "field=v1,v2,...: one run per value, in <workdir>/<field>=<value>; "
    "several --sweep: their product",
)
DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "print the plan (counts, mesh, shardings, memory per device); no run"
)
MEMORY_PLAN = flags.DEFINE_bool(
    "memory_plan",
    True,
    "with --dry_run: compile the train step for the mesh (abstract inputs, nothing "
    "allocated) and print its memory per device; --nomemory_plan: counts and shardings only",
)
DEVICE_MEMORY_GB = flags.DEFINE_float(
    "device_memory_gb",
    0.0,
    "with --dry_run: one device's memory in GB (1e9 bytes) to check the plan against; "
    "0: the runtime's allocator limit, else a table by device kind",
)
TARGET = flags.DEFINE_string(
    "target",
    None,
    "with --dry_run: compile the train step for this accelerator by its own compiler, on any "
    "machine (v5p-8, v5p-64, v5e-16, v6e-8, v5p:2x2x2, h100x8, h200x16; needs .[aot]) and "
    "print its memory, FLOPs, bytes, collectives and estimated step time",
)
SUGGEST = flags.DEFINE_bool(
    "suggest",
    True,
    "with --dry_run: when the step does not fit, compile the changes that may make it fit "
    "(the mesh, remat, grad_accum) and print the first that does",
)
EXPERIMENT = flags.DEFINE_string(
    "experiment", None, f"run a study of the paper: {', '.join(experiments.NAMES)}"
)
SIZE = flags.DEFINE_string(
    "size",
    None,
    "with --experiment: the config size of its runs (default cpu; scaling: "
    "a list of its rungs, default all)",
)
SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "with --experiment: the seeds")
LRS = flags.DEFINE_list(
    "lrs",
    [],
    "with --experiment: a learning-rate grid; each arm also runs at these on the first "
    "seed and at its best (on the selection half of the held-out windows) on the others",
)
# Around a trained model (polyjax.sample, polyjax.lm_eval_model): --workdir names the run.
SAMPLE = flags.DEFINE_bool("sample", False, "print text from --workdir's model")
PROMPT = flags.DEFINE_string("prompt", "", "with --sample: the text to continue")
MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "with --sample")
TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "with --sample; 0: greedy")
TOP_K = flags.DEFINE_integer("top_k", 0, "with --sample; 0: off")
TOP_P = flags.DEFINE_float("top_p", 0.95, "with --sample; 1: off")
NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "with --sample")
SEED = flags.DEFINE_integer("seed", 0, "with --sample or --eval")
EVAL = flags.DEFINE_bool("eval", False, "lm-eval tasks on --workdir's model (needs .[eval])")
TASKS = flags.DEFINE_string(
    "tasks", "", "with --eval, or --experiment (scores each final checkpoint): a,b,... or paper"
)
LIMIT = flags.DEFINE_float("limit", None, "with --eval: examples per task (testing)")
NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "with --eval")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "with --eval")
INCLUDE_PATH = flags.DEFINE_string("include_path", None, "with --eval: a folder of task YAMLs")
COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host)")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: the process count")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
FLAGS = flags.FLAGS
app.define_help_flags()


# =============================================================================
# Flags: parsing, and one line for anything bad.


@contextlib.contextmanager
def bad_input():
    """Inside: a ValueError is the user's input at fault (an ``app.UsageError``)."""
    try:
        yield
    except ValueError as e:
        raise app.UsageError(str(e)) from None


def parse_flags(argv: Sequence[str]) -> list[str]:
    """Parse ``argv`` (the program first) into FLAGS and return the positional
    arguments; any problem is an ``app.UsageError``. Safe to call again: the
    override flags that config_flags defined for the last parse are removed."""
    argv = list(argv)
    if not any(re.match(r"--?config(=|$)", a) for a in argv[1:]):
        argv.insert(1, f"--config={DEFAULT_CONFIG}")  # so that overrides apply to it
    _PARSED_ARGV[:] = argv
    FLAGS.unparse_flags()
    for name in [n for n in FLAGS if n.startswith("config.")]:
        delattr(FLAGS, name)
    try:
        try:
            rest = FLAGS(argv)
            CONFIG.value.to_dict()  # config_flags defers a file it cannot load to the first use
        except flags.Error as e:
            raise app.UsageError(_flag_error(e)) from None
        except OSError as e:  # the config file cannot be loaded (with overrides: while parsing)
            raise app.UsageError(f"--config: {_innermost(e).splitlines()[-1].strip()}") from None
        except (AttributeError, KeyError) as e:  # config_flags: an override that names no field
            raise app.UsageError(_unknown_field(argv) or repr(e)) from None
    except app.UsageError:
        FLAGS.mark_as_parsed()  # absl's app.run reads its own flags when main exits non-zero
        raise
    return rest


def _innermost(e: BaseException) -> str:
    while e.__context__ is not None:
        e = e.__context__
    return str(e)


def _flag_error(e: flags.Error) -> str:
    """A config file's own error (from ``get_config``), or else absl's message."""
    text = str(e)
    return _innermost(e) if text.startswith("flag --config=") else text


def _unknown_field(argv: Sequence[str]) -> str | None:
    """The first ``--config.<field>`` of ``argv`` that names no field of the config,
    with the fields whose names are close."""
    i = next(i for i, a in enumerate(argv) if re.match(r"--?config(=|$)", a))
    spec = argv[i].partition("=")[2] if "=" in argv[i] else argv[i + 1]
    sections, fields = _paths(FLAGS["config"].parser.parse(spec))
    for arg in argv:
        path = re.match(r"--?(?:no)?config\.([^=]+)", arg)
        if path and path[1] not in fields + sections:
            close = difflib.get_close_matches(path[1], fields, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else "no close match"
            return f"unknown config field {path[1]!r}; {hint}"
    return None


def _paths(cfg: ml_collections.ConfigDict, prefix: str = "") -> tuple[list[str], list[str]]:
    """The sections and the fields of ``cfg``, as dotted paths."""
    sections, fields = [], []
    for key, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            sections.append(f"{prefix}{key}")
            inner = _paths(value, f"{prefix}{key}.")
            sections, fields = sections + inner[0], fields + inner[1]
        else:
            fields.append(f"{prefix}{key}")
    return sections, fields


def init_distributed() -> None:
    """``jax.distributed.initialize`` from the flags, or from the cluster launcher
    that started this process (SLURM, Open MPI, MPICH, Cloud TPU: ``polyjax.cluster``);
    one line on stdout says which, and the process count."""
    with bad_input():
        said = cluster.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
    if said:
        print(f"launch.py: {said}", flush=True)


def sweep_root() -> pathlib.Path:
    """``--workdir`` (default runs/<config name>): a run's workdir, a sweep's root."""
    given = WORKDIR.value or str(pathlib.Path("runs") / CONFIG.value.name)
    return wd.path(given) if wd.is_remote(given) else pathlib.Path(given)  # gs://... kept


def sweep_points() -> list[tuple[ml_collections.ConfigDict, pathlib.Path]]:
    """(config, workdir) for each point of the sweeps' product (one point without):
    the config that adding ``--config.<field>=<value>`` gives, in the workdir
    ``<workdir>/<field>=<value>`` (default workdir: runs/<config name>)."""
    base, root = CONFIG.value, sweep_root()
    axes = []
    for sweep in SWEEP.value:
        field, sep, values = sweep.partition("=")
        if not (sep and field and values.strip(",")):
            raise app.UsageError(f"--sweep {sweep!r}: expected field=v1,v2,...")
        axes.append([f"{field}={v}" for v in values.split(",") if v])
    if not axes:
        return [(base, root)]
    points = []
    for parts in itertools.product(*axes):
        try:
            parse_flags([*_COMMAND, *(f"--config.{p}" for p in parts)])
        except app.UsageError as e:
            raise app.UsageError(f"--sweep {','.join(parts)}: {e}") from None
        cfg = CONFIG.value
        cfg.name = f"{base.name}[{','.join(parts)}]"
        points.append((cfg, root.joinpath(*parts)))
    return points


# =============================================================================
# The modes.


def train_mode() -> int:
    """Train each point of the sweep (one without) in its workdir."""
    with bad_input():
        root = sweep_root()  # before sweep_points parses each point's flags
        runs = [(Spec.from_config(cfg), workdir) for cfg, workdir in sweep_points()]
        for spec, workdir in runs:  # every point's cheap checks before the first trains
            train.check_inputs(spec, workdir, verify=False)
    for spec, workdir in runs:
        try:
            train.train(spec, workdir)
        except InputError as e:
            return _usage_error(e)
        except ckpt.SaveError as e:
            print(f"launch.py: {e}", file=sys.stderr, flush=True)
            return SAVE_EXIT
        except ckpt.PreemptionError as e:
            launcher = str(pathlib.Path(__file__).absolute())
            command = shlex.join([sys.executable, launcher, *_COMMAND[1:]])
            print(
                f"launch.py: {e}; checkpoint saved in {workdir}/checkpoints; "
                f"resume with: {command}",
                file=sys.stderr,
                flush=True,
            )
            return e.exit_code
        except nonfinite.NonFiniteError as e:
            print(f"launch.py: {e}", file=sys.stderr, flush=True)
            return NONFINITE_EXIT
    if SWEEP.value and jax.process_index() == 0:  # the points compared, in the sweep's root
        mx.write_sweep(root, {str(w.relative_to(root)): w for _, w in runs})
        print(f"sweep: {root}/{mx.SWEEP}.md, .csv, .png", flush=True)
    return 0


def plan(spec: Spec) -> str:
    """Parameter counts, the mesh and the sharding plan, computed abstractly."""
    counts, mesh = param_counts(spec.model), spec.mesh
    return "\n".join(
        [
            f"config {spec.name}",
            f"parameters: total {counts['total']:,}  active {counts['active']:,}  "
            f"embedding {counts['embedding']:,}",
            f"devices: {mesh.devices.size} x {mesh.devices.flat[0].device_kind}",
            f"batch: {spec.data.global_batch} x {spec.data.seq_len} tokens, "
            f"{shd.batch_sharding(mesh).spec}, {spec.optim.grad_accum} microbatch(es)",
            f"training FLOPs/token: {flops_per_token(spec.model, spec.data.seq_len):.4g}",
            "sharding plan (parameter, shape, logical axes -> mesh axes):",
            shd.describe(spec.model, mesh, spec.rules),
        ]
    )


def data_note(spec: Spec) -> str:
    """One line on the run's data, from ``train.check_data``: what it found, or why
    the run would stop (a dry run goes on without the data)."""
    try:
        checked = train.check_data(spec)
    except ValueError as e:
        return f"data: NOT READY (a run would stop here): {e}"
    if checked.store_tokens is not None:
        found = f"a token store of {checked.store_tokens:,} tokens"
    else:
        found = f"{checked.text_bytes / 1e6:,.1f} MB of text, tokenised by the trainer"
    return f"data: {spec.data.source}: {found}; vocabulary {checked.vocab_size:,}"


def dry_run_mode() -> int:
    """Print the plan of each point of the sweep: counts, mesh, shardings, the data
    checks (a note, not an error: the data may live elsewhere) and, unless
    --nomemory_plan, the memory per device of the train step compiled from abstract
    inputs; with --target, compiled for that accelerator (``polyjax.aot``). Nothing is
    allocated or written. A step that does not fit: one line on stderr, the changes
    that would fit (--suggest), exit status 1."""
    with bad_input():
        target = aot.get_target(TARGET.value) if TARGET.value else None
        devices = target.devices if target else None
        runs = [(Spec.from_config(cfg, devices), workdir) for cfg, workdir in sweep_points()]
    capacity = DEVICE_MEMORY_GB.value * 1e9 or None
    status = 0
    for spec, workdir in runs:
        print(f"{plan(spec)}\n{data_note(spec)}", flush=True)
        verdict = None
        if target is not None:
            try:
                report = aot.compile_report(spec, target)
                print(report.describe(), flush=True)
                verdict = report.verdict
            except aot.DoesNotFitError as e:
                verdict = str(e)
        elif MEMORY_PLAN.value:
            memory_plan = memory.plan(spec, capacity)
            print(memory_plan.describe(), flush=True)
            if memory_plan.fits is False:
                verdict = f"the train step does not fit the device: {memory_plan.summary()}"
        if verdict:
            print(f"launch.py: {verdict}", file=sys.stderr, flush=True)
            if SUGGEST.value:
                print(suggestion(spec, target, capacity), flush=True)
            status = 1
        print(f"workdir {workdir}\n", flush=True)
    return status


def suggestion(spec: Spec, target: aot.Target | None, capacity: float | None) -> str:
    """The first of ``memory.changes_to_fit`` whose compiled step fits, as flags."""
    devices = target.devices if target else None
    tried = []
    for changes in memory.changes_to_fit(spec):
        flat = " ".join(f"--config.{k}={v}" for k, v in changes.items())
        tried.append(flat)
        config = memory.with_changes(spec.config, changes)
        candidate = Spec.from_config(config, devices)
        try:
            fitting = aot.plan(candidate, target) if target else memory.plan(candidate, capacity)
        except aot.DoesNotFitError:
            continue
        if fitting.fits:
            return f"fits with: {flat}  ({fitting.summary()})"
    return "no change tried fits (" + "; ".join(tried) + "): more devices, or a smaller batch"


def experiment_mode() -> int:
    """``--experiment NAME``: the study's runs (``--config.*`` overrides apply to
    each), table and plots under the workdir."""
    with bad_input():
        seeds = [int(s) for s in SEEDS.value]
        try:
            lrs = tuple(float(v) for v in LRS.value)
        except ValueError:
            raise ValueError(
                f"--lrs={','.join(LRS.value)}: expected numbers, e.g. 3e-3,1e-2"
            ) from None
        overrides = config_flags.get_override_values(FLAGS["config"])
        tasks = tuple(t.strip() for t in TASKS.value.split(",") if t.strip())
        controls = experiments.study.Controls(lrs=lrs, tasks=tasks)
        experiments.run(
            EXPERIMENT.value,
            out=WORKDIR.value,
            size=SIZE.value,
            seeds=seeds,
            extra=overrides,
            controls=controls,
        )
    return 0


def _trained_workdir() -> str:
    if not WORKDIR.value:
        raise app.UsageError("--sample and --eval need --workdir (a trained run)")
    return WORKDIR.value


def sample_mode() -> int:
    """``--sample``: print text continuing ``--prompt`` from ``--workdir``'s model."""
    from polyjax import sample

    with bad_input():
        sample.main(
            _trained_workdir(),
            PROMPT.value,
            max_new_tokens=MAX_NEW_TOKENS.value,
            temperature=TEMPERATURE.value,
            top_k=TOP_K.value,
            top_p=TOP_P.value,
            seed=SEED.value,
            num_samples=NUM_SAMPLES.value,
        )
    return 0


def eval_mode() -> int:
    """``--eval``: lm-eval-harness tasks on ``--workdir``'s model; a table and JSON
    in the workdir."""
    workdir = _trained_workdir()
    try:
        from polyjax import lm_eval_model
    except ImportError as e:
        raise app.UsageError(f"--eval needs lm-eval ({e}): pip install -e '.[eval]'") from None
    limit = LIMIT.value
    with bad_input():
        lm_eval_model.main(
            workdir,
            TASKS.value,
            limit=limit if limit is None or limit < 1 else int(limit),
            num_fewshot=NUM_FEWSHOT.value,
            batch_size=BATCH_SIZE.value,
            include_path=INCLUDE_PATH.value,
            seed=SEED.value,
        )
    return 0


MODES = {
    "experiment": experiment_mode,
    "dry_run": dry_run_mode,
    "sample": sample_mode,
    "eval": eval_mode,
}


def main(argv: Sequence[str]) -> int:
    """Run the mode the parsed flags select; bad input is one line and exit 2."""
    if not FLAGS["verbosity"].present:  # Orbax logs through absl, from its save threads too:
        # its errors reach the user as launch.py's one line (--verbosity=-1 shows them)
        absl_logging.set_verbosity(absl_logging.FATAL)
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        sys.unraisablehook = _quiet_closed_loops
        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
    try:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected argument {argv[1]!r}")
        chosen = [name for name in MODES if FLAGS[name].value]
        if len(chosen) > 1:
            raise app.UsageError(f"--{chosen[0]} and --{chosen[1]} are separate modes; give one")
        if TARGET.value:  # compiles for a chip that is not here: one process, on the CPU
            aot.prepare()
        else:
            init_distributed()
        return MODES[chosen[0]]() if chosen else train_mode()
    except app.UsageError as e:
        return _usage_error(e)


def _quiet_closed_loops(unraisable) -> None:
    """After a failed save, TensorStore's callbacks find Orbax's event loop closed (and
    its coroutines are left unawaited): not worth a traceback each, the save's error
    is reported."""
    if not str(unraisable.exc_value).startswith("Event loop is closed"):
        sys.__unraisablehook__(unraisable)


def _usage_error(e: Exception) -> int:
    print(f"launch.py: error: {(str(e) or repr(e)).splitlines()[0]}", file=sys.stderr)
    return USAGE_EXIT


def run(argv: Sequence[str]) -> int:
    """Parse ``argv`` (the arguments, without the program) and run; returns the exit
    status. What ``python launch.py ARGS`` does, callable in-process (tests)."""
    _COMMAND[:] = ["launch.py", *argv]
    try:
        rest = parse_flags(_COMMAND)
    except app.UsageError as e:
        return _usage_error(e)
    return main(rest)


def _parse_or_exit(argv: list[str]) -> list[str]:
    _COMMAND[:] = argv
    try:
        return parse_flags(argv)
    except app.UsageError as e:
        sys.exit(_usage_error(e))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_or_exit)
