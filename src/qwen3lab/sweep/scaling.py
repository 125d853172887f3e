"""`qwen3lab scaling DIR`: a scaling law from a sweep over model sizes and token budgets, and what it predicts.

    L(N, D) = E + A / N^alpha + B / D^beta

fitted as Hoffmann et al. (2022)'s third approach: the Huber loss (delta 1e-3) between the log of the law, written
LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, and the log of the measured losses,
minimised by L-BFGS from the best starts of a grid; intervals by bootstrap over the points. Each (N, D) point is
the best trial there: the law is the loss at the best learning rate. N counts non-embedding parameters by default
(Kaplan et al. 2020): with a 151,936-token vocabulary the embedding is most of a small model's count, and a law in
the total does not carry from small shapes to large ones.

The loss-optimal learning rate (and batch size, when the sweep varies it) follows a power law: at each (N, D) the
optimum of a parabola in log(value) through the best value of the grid and its neighbours, then least squares of
log optimum = c + k log N (+ m log D when the budgets vary).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NAMES = ("E", "A", "alpha", "B", "beta")
HUBER_DELTA = 1e-3
# (a, b, e, alpha, beta): A and B up to e^100, E in [e^-20, e^10], exponents in [0, 3] — wider than any law measured,
# and narrow enough that a refit on a few points cannot run off to an overflow
BOUNDS = [(-20, 100), (-20, 100), (-20, 10), (0, 3), (0, 3)]


@dataclass
class Law:
    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def __call__(self, N, D):
        return self.E + self.A / np.asarray(N, float) ** self.alpha + self.B / np.asarray(D, float) ** self.beta


def _residuals(theta: np.ndarray, logN, logD, logL) -> tuple[np.ndarray, np.ndarray]:
    """theta [S, 5] = (a, b, e, alpha, beta) -> residuals [S, P] of the log-law, and its terms' softmax [3, S, P]."""
    a, b, e, alpha, beta = (theta[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * logN, b - beta * logD, np.broadcast_to(e, (len(theta), len(logN)))])
    lse = np.logaddexp.reduce(terms, axis=0)
    return lse - logL, np.exp(terms - lse)


def _huber(r: np.ndarray) -> np.ndarray:
    return np.where(np.abs(r) <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA))


def _objective(theta: np.ndarray, logN, logD, logL) -> np.ndarray:
    """[S, 5] starts -> [S] summed Huber losses."""
    return _huber(_residuals(theta, logN, logD, logL)[0]).sum(axis=1)


def _value_and_grad(t: np.ndarray, logN, logD, logL) -> tuple[float, np.ndarray]:
    """One theta [5] -> (objective, its gradient [5]), for L-BFGS."""
    r, w = _residuals(t[None], logN, logD, logL)
    r, w = r[0], w[:, 0]  # [P], [3, P]
    h = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # the Huber loss's derivative
    grad = np.array([h @ w[0], h @ w[1], h @ w[2], -(h * w[0]) @ logN, -(h * w[1]) @ logD])
    return float(_huber(r).sum()), grad


GRID = np.array(
    list(
        itertools.product(
            np.arange(0, 30, 5),
            np.arange(0, 30, 5),
            np.arange(-1, 1.5, 0.5),
            np.arange(0, 2.5, 0.5),
            np.arange(0, 2.5, 0.5),
        )
    ),
    float,
)  # Hoffmann et al.'s grid of starts over (a, b, e, alpha, beta)


def fit_law(N, D, L, starts: np.ndarray | None = None, n_best: int = 16) -> tuple[Law, np.ndarray]:
    """The law through points (N, D, L) -> (Law, theta). L-BFGS from the n_best starts of `starts` (the grid)."""
    from scipy.optimize import minimize

    logN, logD, logL = (np.log(np.asarray(x, float)) for x in (N, D, L))
    starts = GRID if starts is None else starts
    lo, hi = np.array(BOUNDS).T
    ranked = np.clip(starts[np.argsort(_objective(starts, logN, logD, logL))[:n_best]], lo, hi)
    best = None
    for x0 in ranked:
        # the objective is ~1e-6 (residuals of a few 1e-3): L-BFGS-B's default tolerances would stop at the start
        res = minimize(
            _value_and_grad,
            x0,
            args=(logN, logD, logL),
            jac=True,
            method="L-BFGS-B",
            bounds=BOUNDS,
            options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 2000},
        )
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    return Law(E=math.exp(e), A=math.exp(a), alpha=alpha, B=math.exp(b), beta=beta), best.x


def bootstrap(N, D, L, theta: np.ndarray, samples: int = 200, seed: int = 0) -> list[Law]:
    """Refits on points drawn with replacement, each started from the full fit and the grid's best starts (from the
    full fit alone, a refit can stay in its basin and the intervals come out too narrow)."""
    rng = np.random.default_rng(seed)
    N, D, L = (np.asarray(x, float) for x in (N, D, L))
    laws = []
    for _ in range(samples):
        pick = rng.integers(0, len(L), len(L))
        laws.append(fit_law(N[pick], D[pick], L[pick], np.concatenate([theta[None], GRID]), n_best=4)[0])
    return laws


def interval(values, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.percentile(np.asarray(values, float), [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


# ---- from a sweep's trials ----


def points(rows: list[dict], params: str = "non_embedding", direction: str = "minimize") -> dict:
    """{(N, D): best row} over the finished trials; N from the trial's parameter count, D its tokens seen."""
    column = "parameters_non_embedding" if params == "non_embedding" else "parameters"
    best = {}
    for r in rows:
        if r["status"] != "done" or r["metric"] is None or not r["tokens"]:
            continue
        key = (r[column], r["tokens"])
        if key not in best or (r["metric"] < best[key]["metric"]) == (direction == "minimize"):
            best[key] = r
    return best


def optimum(rows: list[dict], key: str) -> tuple[float, bool]:
    """The loss-optimal value of `key` among rows of one (N, D) -> (value, at the grid's edge)."""
    by_value = {}
    for r in rows:
        by_value[r[key]] = min(by_value.get(r[key], math.inf), r["metric"])
    xs = sorted(by_value)
    ys = [by_value[x] for x in xs]
    j = int(np.argmin(ys))
    if j in (0, len(xs) - 1) or len(xs) < 3:
        return float(xs[j]), len(xs) > 1
    lx = np.log(xs[j - 1 : j + 2])
    c2, c1, _ = np.polyfit(lx, ys[j - 1 : j + 2], 2)  # a parabola in log(value); c2 > 0 around a minimum
    return float(math.exp(-c1 / (2 * c2))), False


def optimum_law(rows: list[dict], key: str, params: str = "non_embedding") -> dict | None:
    """log optimum = c + k log N (+ m log D): each (N, D)'s optimum of `key`, then least squares."""
    column = "parameters_non_embedding" if params == "non_embedding" else "parameters"
    done = [r for r in rows if r["status"] == "done" and r["metric"] is not None and r.get(key) is not None]
    groups = {}
    for r in done:
        groups.setdefault((r[column], r["tokens"]), []).append(r)
    fits = [(n, d, *optimum(g, key)) for (n, d), g in sorted(groups.items()) if len({r[key] for r in g}) > 1]
    if len({n for n, *_ in fits}) < 2:
        return None
    use_d = len({d for _, d, *_ in fits}) > 1
    X = np.array([[1.0, math.log(n)] + ([math.log(d)] if use_d else []) for n, d, *_ in fits])
    y = np.log([v for *_, v, _ in fits])
    coef = np.linalg.lstsq(X, y, rcond=None)[0]
    return {
        "key": key,
        "c": float(coef[0]),
        "k": float(coef[1]),
        "m": float(coef[2]) if use_d else 0.0,
        "points": [{"N": n, "D": d, "optimum": v, "at_edge": edge} for n, d, v, edge in fits],
    }


def predict_optimum(law: dict, N: float, D: float) -> float:
    return math.exp(law["c"] + law["k"] * math.log(N) + law["m"] * math.log(D))


def scaling(rows: list[dict], direction: str, params: str = "non_embedding", samples: int = 200) -> dict:
    """The law, its bootstrap, and the optimum laws of the varied learning rates and batch sizes."""
    best = points(rows, params, direction)
    if len({n for n, _ in best}) < 2 or len({d for _, d in best}) < 2 or len(best) < 5:
        raise ValueError(
            f"a scaling fit needs finished trials at >= 2 model sizes and >= 2 token budgets (>= 5 points); "
            f"this sweep has {len(best)} points"
        )
    N, D = np.array([k[0] for k in best], float), np.array([k[1] for k in best], float)
    L = np.array([r["metric"] for r in best.values()], float)
    law, theta = fit_law(N, D, L)
    boots = bootstrap(N, D, L, theta, samples)
    keys = [k for k in ("optim.lr", "optim.muon_lr", "batch_size") if k in rows[0]] if rows else []
    return {
        "law": law,
        "boots": boots,
        "points": {"N": N.tolist(), "D": D.tolist(), "L": L.tolist()},
        "intervals": {name: interval([getattr(b, name) for b in boots]) for name in NAMES},
        "optima": [o for k in keys if (o := optimum_law(rows, k, params)) is not None],
        "params": params,
    }


def prediction(fit: dict, N: float, D: float) -> dict:
    """The law's loss at (N, D) with its bootstrap interval, and each optimum law's value there."""
    loss = float(fit["law"](N, D))
    out = {"N": N, "D": D, "loss": loss, "interval": interval([float(b(N, D)) for b in fit["boots"]])}
    out["optima"] = {o["key"]: predict_optimum(o, N, D) for o in fit["optima"]}
    return out


def save(fit: dict, pred: dict | None, path: Path) -> None:
    data = {k: v for k, v in fit.items() if k not in ("law", "boots")}
    data["law"] = {name: getattr(fit["law"], name) for name in NAMES}
    path.write_text(json.dumps(data | {"prediction": pred}, indent=1) + "\n")


def plot(fit: dict, png: Path, marks: list[tuple[float, float, float, str]] = ()) -> None:
    """Loss against N, the points and the law's curve at each token budget; marks: (N, D, loss, label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = fit["points"]
    Ns = [m[0] for m in marks] + p["N"]
    grid = np.geomspace(min(Ns) / 1.3, max(Ns) * 1.3, 100)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labelled = set()
    for i, d in enumerate(sorted(set(p["D"]) | {m[1] for m in marks})):
        color = f"C{i}"
        pts = [(n, loss) for n, dd, loss in zip(p["N"], p["D"], p["L"], strict=True) if dd == d]
        if pts:
            ax.plot(*zip(*sorted(pts), strict=True), "o", color=color, label=f"trials, D = {d:,.0f} tokens")
        ax.plot(grid, fit["law"](grid, d), "-", color=color, alpha=0.6)
        lo, hi = zip(*[interval([float(b(n, d)) for b in fit["boots"]]) for n in grid], strict=True)
        ax.fill_between(grid, lo, hi, color=color, alpha=0.12)
        for n, dd, loss, label in marks:
            if dd == d:
                style = "*" if "measured" in label else "D"
                ax.plot([n], [loss], style, ms=11, color=color, mec="k", label=None if label in labelled else label)
                labelled.add(label)
    ys = p["L"] + [m[2] for m in marks]
    ax.set_ylim(min(ys) - 0.1 * (max(ys) - min(ys)), max(ys) + 0.25 * (max(ys) - min(ys)))  # not the bands' tails
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N" if fit["params"] == "non_embedding" else "parameters N")
    ax.set_ylabel("eval loss")
    law = fit["law"]
    ax.set_title(f"L = {law.E:.3f} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def target_parameters(target: str, sweep_dir: str | Path, params: str = "non_embedding") -> int:
    """N of a target: a preset name, a model folder, or a model_config mapping (YAML / JSON) over the sweep's model."""
    import yaml

    from ..model.config import PRESETS, ModelConfig, preset
    from ..train.config import load_train_config, model_shape

    if target in PRESETS:
        shape = preset(target)
    elif Path(target, "config.json").is_file():
        shape = ModelConfig.from_file(target)
    else:
        keys = yaml.safe_load(target)
        trials = sorted(Path(sweep_dir).glob("trial-*/trial.yaml"))
        if not isinstance(keys, dict) or not trials:
            raise ValueError(f"--target {target!r}: give a preset, a model folder or a model_config mapping")
        cfg = load_train_config(trials[0])
        cfg.model_config = keys
        shape = model_shape(cfg)
    return shape.num_parameters(embedding=params != "non_embedding")


def describe(fit: dict, metric: str, pred: dict | None = None, target: str = "") -> str:
    """The law with its intervals and the optimum laws, or (pred) the prediction for a target, as text."""
    if pred is not None:
        lo, hi = pred["interval"]
        line = f"target {target}: N = {pred['N']:,.0f}, D = {pred['D']:,.0f} tokens: predicted {metric} "
        line += f"{pred['loss']:.4f} [{lo:.4f}, {hi:.4f}]"
        return line + "".join(f"; {k} {v:.3g}" for k, v in pred["optima"].items())
    p, law = fit["points"], fit["law"]
    n_sizes, n_budgets = len(set(p["N"])), len(set(p["D"]))
    lines = [
        f"{len(p['L'])} points ({n_sizes} sizes x {n_budgets} token budgets), each the best trial there",
        f"L(N, D) = E + A / N^alpha + B / D^beta    (N: {fit['params'].replace('_', '-')} parameters; "
        f"95% intervals from {len(fit['boots'])} bootstrap refits)",
    ]
    for name in NAMES:
        lo, hi = fit["intervals"][name]
        lines.append(f"  {name:6} {getattr(law, name):12.5g}   [{lo:.5g}, {hi:.5g}]")
    for o in fit["optima"]:
        d = f" * D^{o['m']:.3f}" if o["m"] else ""
        edge = sum(q["at_edge"] for q in o["points"])
        note = f" ({edge} of {len(o['points'])} optima at the grid's edge)" if edge else ""
        lines.append(f"loss-optimal {o['key']} = {math.exp(o['c']):.4g} * N^{o['k']:.3f}{d}{note}")
    return "\n".join(lines)


def run_scaling(sweep_dir: str, target: str | None, tokens: float | None, params: str, samples: int) -> dict:
    """`qwen3lab scaling DIR`: fit, print, and write scaling.json and scaling.png into DIR."""
    from .report import load_report

    spec, rows = load_report(sweep_dir)
    fit = scaling(rows, spec["direction"], params, samples)
    print(describe(fit, spec["metric"]))
    pred, marks = None, []
    if target:
        pred = prediction(fit, target_parameters(target, sweep_dir, params), tokens or max(fit["points"]["D"]))
        print(describe(fit, spec["metric"], pred, target))
        marks = [(pred["N"], pred["D"], pred["loss"], f"predicted: {target}")]
    save(fit, pred, Path(sweep_dir) / "scaling.json")
    plot(fit, Path(sweep_dir) / "scaling.png", marks)
    print(f"written: {Path(sweep_dir) / 'scaling.json'}, scaling.png")
    return {"fit": fit, "prediction": pred}
