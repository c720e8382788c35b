"""Section 3 made visible: Lemma 1 checked numerically, and how fast PolyReLU and ReLU
networks approximate smooth functions as they grow (Theorems 2 and 3).

Each network is an MLP with two hidden layers of width W on [-1, 1]^d, trained full
batch with Adam at the best of three learning rates; the error is the max and RMS
error on a dense test grid, as the median and quartiles over seeds (run in parallel).
Writes lemma1.md, table.md, table.csv and approx.png.

    python -m experiments.theory --out runs/experiments/theory [--quick]
"""

from __future__ import annotations

import argparse
import csv
import math
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from polyjax import activations as acts

TARGETS: dict[str, tuple[int, Callable]] = {
    "sin(pi x)": (1, lambda x: jnp.sin(jnp.pi * x[..., 0])),
    "exp(x) cos(3x)": (1, lambda x: jnp.exp(x[..., 0]) * jnp.cos(3 * x[..., 0])),
    "sin(pi x) cos(pi y)": (2, lambda x: jnp.sin(jnp.pi * x[..., 0]) * jnp.cos(jnp.pi * x[..., 1])),
}


def lemma1_table(orders=(1, 2, 3, 4, 5, 6), seed: int = 0) -> list[dict]:
    """Max error of Poly(x) = PolyReLU_1(x) + PolyReLU_2(-x) for random polynomials."""
    rng = np.random.default_rng(seed)
    x = jnp.linspace(-2.0, 2.0, 4001)
    rows = []
    for r in orders:
        a = rng.normal(size=r + 1).astype(np.float32)
        w2 = np.array([(-1) ** i * a[i] for i in range(1, r + 1)], np.float32)
        rep = acts.polyrelu(x, a[1:], a[:1]) + acts.polyrelu(-x, w2, np.zeros(1, np.float32))
        exact = np.polyval(a[::-1].astype(np.float64), np.asarray(x, np.float64))
        rows.append(
            {
                "order": r,
                "max_abs_error": float(np.max(np.abs(rep - exact))),
                "max_abs_value": float(np.max(np.abs(exact))),
            }
        )
    relu_err = float(
        jnp.max(jnp.abs(acts.polyrelu(x, jnp.array([1.0, 0, 0]), jnp.zeros(1)) - acts.relu(x)))
    )
    relu2_err = float(
        jnp.max(jnp.abs(acts.polyrelu(x, jnp.array([0.0, 1, 0]), jnp.zeros(1)) - acts.relu2(x)))
    )
    rows.append({"order": "ReLU (a=[1,0,0])", "max_abs_error": relu_err, "max_abs_value": 2.0})
    rows.append({"order": "ReLU^2 (a=[0,1,0])", "max_abs_error": relu2_err, "max_abs_value": 4.0})
    return rows


def _init(key, d_in: int, width: int, act: str) -> dict:
    k1, k2, k3 = jax.random.split(key, 3)
    params = {
        "w1": jax.random.normal(k1, (d_in, width)) * math.sqrt(2.0 / d_in),
        "b1": jnp.zeros(width),
        "w2": jax.random.normal(k2, (width, width)) * math.sqrt(2.0 / width),
        "b2": jnp.zeros(width),
        "w3": jax.random.normal(k3, (width, 1)) * math.sqrt(1.0 / width),
        "b3": jnp.zeros(1),
    }
    if act == "polyrelu":  # one set of coefficients per layer, the paper's init
        for layer in ("1", "2"):
            params["a" + layer], params["c" + layer] = acts.init_coeffs(3)
    return params


def _forward(params: dict, x, act: str):
    h = x
    for layer in ("1", "2"):
        z = h @ params["w" + layer] + params["b" + layer]
        if act == "polyrelu":
            h = acts.polyrelu(z, params["a" + layer], params["c" + layer])
        else:
            h = acts.relu(z)
    return (h @ params["w3"] + params["b3"])[..., 0]


def count_params(d_in: int, width: int, act: str) -> int:
    return sum(v.size for v in jax.tree.leaves(_init(jax.random.key(0), d_in, width, act)))


LEARNING_RATES = (1e-3, 3e-3, 1e-2)


def fit(target: str, width: int, act: str, seeds: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Train ``seeds`` networks for each learning rate in LEARNING_RATES, all in parallel;
    keep the learning rate with the lowest median training loss and return the max and
    RMS test errors of its seeds (the theorems are about existence, so each activation
    gets its best optimiser setting)."""
    d_in, f = TARGETS[target]
    n_train = 1024 if d_in == 1 else 4096
    x_train = jax.random.uniform(jax.random.key(123), (n_train, d_in), minval=-1, maxval=1)
    grid = jnp.linspace(-1, 1, 2001 if d_in == 1 else 101)
    x_test = grid[:, None] if d_in == 1 else jnp.stack(jnp.meshgrid(grid, grid), -1).reshape(-1, 2)
    y_train, y_test = f(x_train), f(x_test)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam())
    decay = optax.cosine_decay_schedule(1.0, steps, alpha=1e-3)

    def loss(p):
        return jnp.mean(jnp.square(_forward(p, x_train, act) - y_train))

    def train_one(key, lr):
        params = _init(key, d_in, width, act)

        def step(carry, i):
            p, s = carry
            g = jax.grad(loss)(p)
            updates, s = opt.update(g, s, p)
            updates = jax.tree.map(lambda u: -lr * decay(i) * u, updates)
            return (optax.apply_updates(p, updates), s), None

        carry = (params, opt.init(params))
        (params, _), _ = jax.lax.scan(step, carry, jnp.arange(steps))
        err = _forward(params, x_test, act) - y_test
        train_loss = jnp.nan_to_num(loss(params), nan=jnp.inf)
        return train_loss, jnp.max(jnp.abs(err)), jnp.sqrt(jnp.mean(err**2))

    keys = jax.random.split(jax.random.key(width), seeds)
    lrs = jnp.asarray(LEARNING_RATES)
    run = jax.vmap(jax.vmap(train_one, in_axes=(0, None)), in_axes=(None, 0))
    train_loss, max_err, rms_err = jax.jit(run)(keys, lrs)  # each [lr, seed]
    best = int(np.argmin(np.median(np.asarray(train_loss), axis=1)))
    return np.asarray(max_err[best]), np.asarray(rms_err[best])


def approximation_study(widths, seeds: int, steps: int) -> list[dict]:
    rows = []
    for target in TARGETS:
        for act in ("relu", "polyrelu"):
            for width in widths:
                max_err, rms_err = fit(target, width, act, seeds, steps)
                rows.append(
                    {
                        "target": target,
                        "activation": act,
                        "width": width,
                        "params": count_params(TARGETS[target][0], width, act),
                        "max_err_median": float(np.median(max_err)),
                        "max_err_q25": float(np.quantile(max_err, 0.25)),
                        "max_err_q75": float(np.quantile(max_err, 0.75)),
                        "rms_err_median": float(np.median(rms_err)),
                        "seeds": seeds,
                    }
                )
                print(
                    f"{target:22s} {act:9s} width {width:3d}: max err "
                    f"{np.median(max_err):.2e} (median of {seeds} seeds)",
                    flush=True,
                )
    return rows


def loglog_slope(params: list[int], errors: list[float]) -> float:
    """Least-squares slope of log(error) against log(parameters)."""
    return float(np.polyfit(np.log(params), np.log(errors), 1)[0])


def write_outputs(out: pathlib.Path, lemma: list[dict], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    lines = ["| order | max abs error | max abs value |", "|---|---|---|"]
    lines += [
        f"| {r['order']} | {r['max_abs_error']:.2e} | {r['max_abs_value']:.2e} |" for r in lemma
    ]
    (out / "lemma1.md").write_text("\n".join(lines) + "\n")

    with open(out / "table.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    md = [
        "| target | activation | width | params | max error: median [q25, q75] | RMS error |",
        "|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['target']} | {r['activation']} | {r['width']} | {r['params']} | "
        f"{r['max_err_median']:.2e} [{r['max_err_q25']:.1e}, {r['max_err_q75']:.1e}] | "
        f"{r['rms_err_median']:.2e} |"
        for r in rows
    ]
    md += [
        "",
        "| target | activation | log-log slope of the median max error vs params |",
        "|---|---|---|",
    ]
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(5 * len(TARGETS), 4))
    for ax, target in zip(np.atleast_1d(axes), TARGETS, strict=True):
        for act in ("relu", "polyrelu"):
            sel = [r for r in rows if r["target"] == target and r["activation"] == act]
            p = [r["params"] for r in sel]
            m = np.array([r["max_err_median"] for r in sel])
            band = np.array([[r["max_err_q25"], r["max_err_q75"]] for r in sel]).T
            slope = loglog_slope(p, list(m))
            md.append(f"| {target} | {act} | {slope:.2f} |")
            ax.errorbar(
                p,
                m,
                yerr=np.abs(band - m),
                marker="o",
                capsize=3,
                label=f"{act} (slope {slope:.2f})",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("max error on [-1,1]^d")
        ax.set_title(target)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "approx.png", dpi=120)
    plt.close(fig)
    (out / "table.md").write_text("\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/experiments/theory")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--widths", default="2,4,8,16,32")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 widths, 100 steps")
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    seeds, steps = args.seeds, args.steps
    if args.quick:
        widths, seeds, steps = widths[:2], 2, 100
    out = pathlib.Path(args.out)
    lemma = lemma1_table()
    rows = approximation_study(widths, seeds, steps)
    write_outputs(out, lemma, rows)
    print((out / "lemma1.md").read_text())
    print((out / "table.md").read_text())
    print(f"wrote {out}/table.md, table.csv, lemma1.md, approx.png")


if __name__ == "__main__":
    main()
