"""polyjax's command line: run a config, a sweep, or a dry run.

    python launch.py                                   # the main job (configs/default.py)
    python launch.py --config configs/dense.py:act=polyrelu,size=small --config.optim.lr=1e-3
    python launch.py --config configs/dense.py --sweep model.activation.order=1,2,3,4
    python launch.py --config configs/moe.py:size=1b --dry_run
    python launch.py --experiment order --seeds 0,1,2     # a study of the paper (experiments/)
    python launch.py ... --coordinator 10.0.0.1:1234 --num_processes 2 --process_id 0
    python launch.py --sample --workdir runs/default --prompt "ROMEO:" --max_new_tokens 200
    python launch.py --eval --workdir runs/default --tasks arc_easy,hellaswag  # needs .[eval]

Bad input (a misspelt field, a value of the wrong type or range, an unknown
activation, an impossible mesh, a workdir holding another config's checkpoints or
only torn ones) is one line on stderr and exit status 2, before anything compiles.
SIGTERM/SIGINT: the run saves a checkpoint at the step it stopped, prints the
command that resumes it and exits with 143/130. Non-finite values that stop the
run (train.nonfinite): a report on stderr and exit status 3.
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import shlex
import sys

DEFAULT_CONFIG = str(pathlib.Path(__file__).parent / "configs" / "default.py")
POD_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    """The flags, and the ``--config.<field>=<value>`` overrides in order."""
    parser = argparse.ArgumentParser(
        prog="launch.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="path.py[:arg]")
    parser.add_argument("--workdir", help="default: runs/<config name>")
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        help="field=v1,v2,...: one run per value (several --sweep: the product)",
    )
    parser.add_argument("--dry_run", action="store_true", help="print the plan, do not train")
    parser.add_argument(
        "--experiment",
        help="run a study of the paper by name (see experiments/run.py); "
        "--config.* overrides apply to each of its runs",
    )
    parser.add_argument("--scale", default="cpu", help="with --experiment: toy, cpu or paper")
    parser.add_argument("--seeds", default="0,1,2", help="with --experiment: seeds")
    # Around a trained model (polyjax.sample, polyjax.lm_eval_model): --workdir names the run.
    parser.add_argument("--sample", action="store_true", help="print text from --workdir's model")
    parser.add_argument("--prompt", default="", help="with --sample: the text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="with --sample")
    parser.add_argument("--temperature", type=float, default=0.8, help="with --sample; 0: greedy")
    parser.add_argument("--top_k", type=int, default=0, help="with --sample; 0: off")
    parser.add_argument("--top_p", type=float, default=0.95, help="with --sample; 1: off")
    parser.add_argument("--num_samples", type=int, default=1, help="with --sample")
    parser.add_argument("--seed", type=int, default=0, help="with --sample or --eval")
    parser.add_argument("--eval", action="store_true", help="lm-eval tasks on --workdir's model")
    parser.add_argument("--tasks", default="", help="with --eval: a,b,... or paper")
    parser.add_argument("--limit", type=float, help="with --eval: examples per task (testing)")
    parser.add_argument("--num_fewshot", type=int, help="with --eval")
    parser.add_argument("--batch_size", type=int, default=32, help="with --eval")
    parser.add_argument("--include_path", help="with --eval: a folder of task YAMLs")
    parser.add_argument("--coordinator", help="host:port of process 0 (multi-host)")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    args, rest = parser.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):
        flag = rest[i]
        if not flag.startswith("--config."):
            parser.error(f"unrecognised argument {flag!r}")
        field, sep, value = flag[len("--config.") :].partition("=")
        if not sep:
            if i + 1 >= len(rest):
                parser.error(f"{flag} needs a value")
            value, i = rest[i + 1], i + 1
        overrides.append((field, value))
        i += 1
    return args, overrides


def init_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` when the flags or the environment ask for it."""
    import jax

    flags = (args.coordinator, args.num_processes, args.process_id)
    explicit = any(f is not None for f in flags)
    if explicit and any(f is None for f in flags):
        raise ValueError("--coordinator, --num_processes and --process_id go together")
    if explicit or any(os.environ.get(k) for k in POD_ENV):
        # CPU processes need a collectives implementation (no effect on GPU/TPU).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if explicit:
            jax.distributed.initialize(*flags)
        else:
            jax.distributed.initialize()


def runs(base, workdir: str | None, sweeps: list[str]):
    """(config, workdir) for each point of the sweep (one point without); the
    default workdir is runs/<config name>, a point's is <workdir>/<field>=<value>."""
    from polyjax import config as pc

    name = base.name
    root = pathlib.Path(workdir or pathlib.Path("runs") / name)
    axes = [pc.sweep_values(s, base) for s in sweeps]
    if not axes:
        yield base, root
        return
    for values in itertools.product(*(raws for _, raws in axes)):
        cfg = base.copy_and_resolve_references()
        parts = []
        for (path, _), raw in zip(axes, values, strict=True):
            pc.override(cfg, path, raw)
            parts.append(f"{path}={raw}")
        with cfg.unlocked():
            cfg.name = f"{name}[{','.join(parts)}]"
        yield cfg, root.joinpath(*parts)


NONFINITE_EXIT = 3


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_args(argv)
    if args.sample or args.eval:
        return around_a_model(args)
    if args.experiment:
        return experiment(args, overrides)
    try:
        init_distributed(args)
        from polyjax import config as pc
        from polyjax import train

        base = pc.load(args.config)
        for field, value in overrides:
            pc.override(base, field, value)
        points = list(runs(base, args.workdir, args.sweep))
        specs = [(train.Spec.from_config(cfg), workdir) for cfg, workdir in points]
        if not args.dry_run:
            for spec, workdir in specs:
                train.prepare_workdir(spec, workdir)
    except ValueError as e:
        print(f"launch.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    for spec, workdir in specs:
        if args.dry_run:
            print(f"{train.plan(spec)}\nworkdir {workdir}\n")
            continue
        try:
            train.train(spec, workdir)
        except train.PreemptionError as e:
            command = shlex.join([sys.executable, str(pathlib.Path(__file__).absolute()), *argv])
            print(
                f"launch.py: {e}; checkpoint saved in {workdir}/checkpoints; "
                f"resume with: {command}",
                file=sys.stderr,
                flush=True,
            )
            return e.exit_code
        except train.NonFiniteError as e:
            print(f"launch.py: {e}", file=sys.stderr, flush=True)
            return NONFINITE_EXIT
    return 0


def around_a_model(args: argparse.Namespace) -> int:
    """``--sample`` (print text) or ``--eval`` (lm-eval tasks) on ``--workdir``'s model."""
    if not args.workdir:
        print(
            "launch.py: error: --sample and --eval need --workdir (a trained run)", file=sys.stderr
        )
        return 2
    try:
        if args.sample:
            from polyjax import sample

            sample.main(
                args.workdir,
                args.prompt,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
                num_samples=args.num_samples,
            )
        else:
            try:
                from polyjax import lm_eval_model
            except ImportError as e:
                print(
                    f"launch.py: error: --eval needs lm-eval ({e}): pip install -e '.[eval]'",
                    file=sys.stderr,
                )
                return 2

            limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
            lm_eval_model.main(
                args.workdir,
                args.tasks,
                limit=limit,
                num_fewshot=args.num_fewshot,
                batch_size=args.batch_size,
                include_path=args.include_path,
                seed=args.seed,
            )
    except ValueError as e:
        print(f"launch.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


def experiment(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    """``--experiment NAME``: the study's runs, table and plots under the workdir."""
    from experiments import run

    if args.experiment not in run.NAMES:
        print(
            f"launch.py: error: unknown experiment {args.experiment!r}; "
            f"valid: {', '.join(run.NAMES)}",
            file=sys.stderr,
        )
        return 2
    argv = [args.experiment, "--scale", args.scale, "--seeds", args.seeds]
    if args.workdir:
        argv += ["--out", args.workdir]
    try:
        run.main(argv, extra=overrides)
    except ValueError as e:
        print(f"launch.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
