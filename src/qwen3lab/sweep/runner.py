"""`qwen3lab sweep sweep.yaml`: one base config over a grid, random draws or Optuna's TPE; each trial is an ordinary
run folder, so everything that reads runs (`qwen3lab compare`, `eval`, `serve`) reads trials.

    base: configs/demo.yaml                 # the base config (a path relative to this file) ...
    config: {steps: 200}                    # ... and/or keys over it, as in a config file
    out: runs/sweep
    metric: eval_loss                       # a metrics.jsonl key; a trial's value is its last one
    direction: minimize
    method: grid                            # grid | random | tpe (Optuna)
    trials: 0                               # random / tpe: how many (grid: the whole grid)
    parameters:
      optim.lr: [5.0e-4, 1.0e-3, 2.0e-3]    # values: the grid's axis; random / tpe choose among them
      model_config: [{hidden_size: 64}, {hidden_size: 128, num_hidden_layers: 4}]
      optim.warmup_steps: {min: 0, max: 100, int: true}      # a range: random / tpe
      optim.weight_decay: {min: 1.0e-4, max: 0.1, log: true}

Trial i is DIR/trial-{i:03d}: trial.yaml (its whole config), the run's own files, log.txt and trial.json (its
keys, status running / done / failed with the error, the metric). A rerun skips finished trials and resumes the
others (from their checkpoints when save_every is set).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..model.config import ConfigError
from ..train.config import (
    TrainConfig,
    check_train_config,
    config_keys,
    flatten_keys,
    load_train_config,
    model_shape,
    set_key,
    train_config_dict,
)

METHODS = ("grid", "random", "tpe")


@dataclass
class Sweep:
    file: Path
    out: Path
    base: str = ""
    config: dict = field(default_factory=dict)
    metric: str = "eval_loss"
    direction: str = "minimize"
    method: str = "grid"
    trials: int = 0
    seed: int = 0
    parameters: dict = field(default_factory=dict)  # key -> {"values": [...]} or {"min", "max", "log", "int"}
    slurm: list = field(default_factory=list)  # extra "#SBATCH ..." lines for --slurm


def load_sweep(path: str | Path) -> Sweep:
    """The sweep file, checked whole before any trial runs: one ConfigError naming the key and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such sweep file")
    data = yaml.safe_load(path.read_text()) or {}
    names = {f.name for f in dataclasses.fields(Sweep)} - {"file"}
    if not isinstance(data, dict) or set(data) - names:
        raise ConfigError(f"{path}: unknown keys {sorted(set(data) - names)}; a sweep file has {', '.join(names)}")
    sweep = Sweep(file=path, **{**data, "out": Path(data.get("out") or f"runs/{path.stem}")})
    if sweep.method not in METHODS:
        raise ConfigError(f"{path}: method {sweep.method!r} is not one of {', '.join(METHODS)}")
    if sweep.direction not in ("minimize", "maximize"):
        raise ConfigError(f"{path}: direction {sweep.direction!r}; minimize or maximize")
    if not sweep.parameters:
        raise ConfigError(f"{path}: parameters: name the config keys to vary, e.g. optim.lr: [1.0e-4, 3.0e-4]")
    sweep.parameters = {k: _parameter(path, k, v, sweep.method) for k, v in sweep.parameters.items()}
    if sweep.method != "grid" and sweep.trials < 1:
        raise ConfigError(f"{path}: trials: method {sweep.method} needs how many trials to run (trials >= 1)")
    if sweep.method == "tpe":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise ConfigError(f"{path}: method tpe uses Optuna: pip install 'qwen3lab[sweep]' (or grid / random)")
    base = trial_config(sweep, {})
    if sweep.metric.startswith("eval_") and not (base.data.eval or base.data.eval_fraction or base.stages):
        raise ConfigError(f"{path}: metric {sweep.metric} needs held-out data: set data.eval or data.eval_fraction")
    return sweep


def _parameter(path: Path, key: str, spec, method: str) -> dict:
    where = f"{path}: parameters.{key}"
    if key not in config_keys():
        try:
            set_key(TrainConfig(), key, None)  # its message names the keys near it
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    if isinstance(spec, list):
        spec = {"values": spec}
    if isinstance(spec, dict) and "values" in spec:
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise ConfigError(f"{where}: values must be a non-empty list")
        return {"values": spec["values"]}
    ok = isinstance(spec, dict) and {"min", "max"} <= set(spec) <= {"min", "max", "log", "int"}
    try:  # YAML reads 1e-4 (no dot) as a string
        spec = spec | {"min": float(spec["min"]), "max": float(spec["max"])} if ok else spec
    except (TypeError, ValueError):
        ok = False
    if not ok or not spec["min"] < spec["max"] or (spec.get("log") and spec["min"] <= 0):
        raise ConfigError(f"{where}: {spec!r}; give a list of values or {{min, max, log, int}} with 0 < min < max")
    if method == "grid":
        raise ConfigError(f"{where}: a range needs method random or tpe; a grid takes a list of values")
    return {"min": spec["min"], "max": spec["max"], "log": bool(spec.get("log")), "int": bool(spec.get("int"))}


def trial_config(sweep: Sweep, keys: dict, out: Path | None = None) -> TrainConfig:
    """The base config (file, then inline keys), then the trial's keys, its run folder `out`."""
    base = (sweep.file.parent / sweep.base) if sweep.base else None
    try:
        cfg = load_train_config(base, flatten_keys(sweep.config) | keys)
    except ConfigError as e:
        raise ConfigError(f"{sweep.file}: {e}") from None
    if out is not None:
        cfg.out, cfg.progress, cfg.resume = str(out), False, True
    return cfg


def planned_trials(sweep: Sweep) -> list[dict]:
    """Every trial's keys, in order (grid and random; TPE asks as it goes)."""
    if sweep.method == "grid":
        axes = [[(k, v) for v in p["values"]] for k, p in sweep.parameters.items()]
        return [dict(combo) for combo in itertools.product(*axes)]
    rng = random.Random(sweep.seed)
    return [{k: _draw(rng, p) for k, p in sweep.parameters.items()} for _ in range(sweep.trials)]


def _draw(rng: random.Random, p: dict):
    if "values" in p:
        return rng.choice(p["values"])
    if p["log"]:
        import math

        x = math.exp(rng.uniform(math.log(p["min"]), math.log(p["max"])))
    else:
        x = rng.uniform(p["min"], p["max"])
    return round(x) if p["int"] else x


# ---- one trial ----


def trial_dir(sweep: Sweep, i: int) -> Path:
    return sweep.out / f"trial-{i:03d}"


def read_trial(folder: Path) -> dict | None:
    path = folder / "trial.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_trial(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "trial.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, folder / "trial.json")  # atomic: a killed sweep never leaves half a record


def prepare_trial(sweep: Sweep, i: int, keys: dict) -> dict:
    """Write trial i's folder: trial.yaml and a running record. A config that cannot run is recorded as failed."""
    folder = trial_dir(sweep, i)
    record = {"trial": i, "keys": keys, "status": "running", "error": None}
    try:
        cfg = check_train_config(trial_config(sweep, keys, folder))
        record |= parameter_counts(cfg)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "trial.yaml").write_text(yaml.safe_dump(train_config_dict(cfg), sort_keys=False))
    except (ConfigError, OSError) as e:  # a bad key or shape, a model folder that is not there
        record |= {"status": "failed", "error": str(e)}
    write_trial(folder, record)
    return record


def parameter_counts(cfg: TrainConfig) -> dict:
    from ..model.config import PRESETS, ModelConfig
    from ..model.hf import resolve_folder

    shape = model_shape(cfg) if cfg.model in PRESETS else ModelConfig.from_file(resolve_folder(cfg.model))
    return {"parameters": shape.num_parameters(), "parameters_non_embedding": shape.num_parameters(embedding=False)}


def trial_command(folder: Path) -> list[str]:
    return [sys.executable, "-m", "qwen3lab", "train", str(folder / "trial.yaml")]


def finish_trial(sweep: Sweep, folder: Path, returncode: int, seconds: float) -> dict:
    """The record of a trial whose process ended: its metric from metrics.jsonl, or the error it printed last."""
    record = read_trial(folder)
    record["seconds"] = round(seconds, 2)
    if returncode != 0:
        log = folder / "log.txt"
        lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
        record |= {"status": "failed", "error": lines[-1] if lines else f"exit status {returncode}"}
    else:
        record |= {"status": "done"} | read_metrics(folder, sweep.metric, sweep.direction)
    write_trial(folder, record)
    return record


def read_metrics(folder: Path, metric: str, direction: str = "minimize") -> dict:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    values = [r[metric] for r in rows if metric in r]
    pick = min if direction == "minimize" else max
    last = rows[-1] if rows else {}
    return {
        "metric": values[-1] if values else None,
        "best": pick(values) if values else None,
        "tokens": last.get("tokens"),
        "steps": last.get("step"),
        "train_seconds": last.get("elapsed"),
    }


# ---- running trials ----


def run_sweep(sweep: Sweep, parallel: int = 0, retry_failed: bool = False) -> list[dict]:
    """Every trial not yet finished, `parallel` at a time as processes (0: one per GPU, or one on the CPU, which
    then has every core); returns the records of all trials."""
    save_sweep_json(sweep)
    source = TPESource(sweep, retry_failed) if sweep.method == "tpe" else PlannedSource(sweep, retry_failed)
    slots = _slot_envs(parallel)
    free, running = list(range(len(slots))), {}  # slot -> (process, trial index, folder, start time)
    try:
        while True:
            while free and (nxt := source.next()) is not None:
                i, keys = nxt
                record = prepare_trial(sweep, i, keys)
                if record["status"] == "failed":  # its config cannot run: recorded, never started
                    _report(sweep, record)
                    source.tell(i, record)
                    continue
                slot = free.pop(0)
                running[slot] = (_start(trial_dir(sweep, i), slots[slot]), i, trial_dir(sweep, i), time.time())
            if not running:
                break
            time.sleep(0.2)
            for slot, (proc, i, folder, t0) in list(running.items()):
                if proc.poll() is not None:
                    record = finish_trial(sweep, folder, proc.returncode, time.time() - t0)
                    _report(sweep, record)
                    source.tell(i, record)
                    del running[slot]
                    free.append(slot)
    finally:  # interrupted: stop the trials still running; their records say running, and a rerun resumes them
        for proc, *_ in running.values():
            proc.terminate()
            proc.wait()
    return all_trials(sweep.out)


def run_one(sweep: Sweep, i: int) -> dict:
    """Trial i of a grid or random sweep in this process's turn (a SLURM array task runs this)."""
    planned = planned_trials(sweep)
    if not 0 <= i < len(planned):
        raise ConfigError(f"--trial {i}: this sweep has trials 0..{len(planned) - 1}")
    record = read_trial(trial_dir(sweep, i))
    if record and record["status"] == "done":
        return record
    save_sweep_json(sweep)
    record = prepare_trial(sweep, i, planned[i])
    if record["status"] == "running":
        t0 = time.time()
        proc = _start(trial_dir(sweep, i), {})
        record = finish_trial(sweep, trial_dir(sweep, i), proc.wait(), time.time() - t0)
    _report(sweep, record)
    return record


def _start(folder: Path, env: dict) -> subprocess.Popen:
    with (folder / "log.txt").open("a") as log:
        return subprocess.Popen(trial_command(folder), stdout=log, stderr=subprocess.STDOUT, env=os.environ | env)


def _slot_envs(parallel: int) -> list[dict]:
    """One environment per worker: its share of the cores, and its own GPU where there are GPUs."""
    import torch

    gpus = torch.cuda.device_count()
    n = parallel or max(gpus, 1)
    threads = max(1, len(os.sched_getaffinity(0)) // n)
    gpu = [{"CUDA_VISIBLE_DEVICES": str(j % gpus)} if gpus else {} for j in range(n)]
    return [{"OMP_NUM_THREADS": str(threads)} | gpu[j] for j in range(n)]


def _report(sweep: Sweep, r: dict) -> None:
    keys = ", ".join(f"{k}={show_value(v, sweep.parameters[k])}" for k, v in r["keys"].items())
    if r["status"] == "done":
        value = "-" if r.get("metric") is None else f"{r['metric']:.4f}"
        print(f"trial {r['trial']:03d} done    {sweep.metric} {value}  ({keys})  {r['seconds']:.0f}s", flush=True)
    else:
        print(f"trial {r['trial']:03d} FAILED  ({keys}): {r['error']}", flush=True)


def show_value(value, parameter: dict | None = None) -> str:
    """A key's value in a line: floats to 3 digits; of a mapping, the fields that differ among the sweep's values."""
    if isinstance(value, dict):
        others = (parameter or {}).get("values") or [value]
        differ = [k for k in value if any(isinstance(o, dict) and o.get(k) != value[k] for o in others)]
        return ",".join(f"{k}={value[k]}" for k in differ or value)
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def save_sweep_json(sweep: Sweep) -> None:
    """DIR/sweep.json: what report and scaling need to read the folder on their own."""
    sweep.out.mkdir(parents=True, exist_ok=True)
    spec = {k: getattr(sweep, k) for k in ("metric", "direction", "method", "trials", "seed", "parameters")}
    (sweep.out / "sweep.json").write_text(json.dumps({"file": str(sweep.file)} | spec, indent=1) + "\n")


def all_trials(out: Path) -> list[dict]:
    return [r for folder in sorted(Path(out).glob("trial-*")) if (r := read_trial(folder))]


class PlannedSource:
    """Grid or random trials in order, skipping those already finished."""

    def __init__(self, sweep: Sweep, retry_failed: bool):
        finished = ("done", "failed") if not retry_failed else ("done",)
        self.todo = [
            (i, keys)
            for i, keys in enumerate(planned_trials(sweep))
            if (r := read_trial(trial_dir(sweep, i))) is None or r["status"] not in finished
        ]

    def next(self):
        return self.todo.pop(0) if self.todo else None

    def tell(self, i: int, record: dict) -> None:
        pass


class TPESource:
    """Optuna's TPE asks for each trial's keys from the trials told so far; finished trials of an earlier run are
    told first, and an interrupted one is asked again with its own keys."""

    def __init__(self, sweep: Sweep, retry_failed: bool):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.sweep, self.optuna = sweep, optuna
        self.dists = {k: _distribution(optuna, p) for k, p in sweep.parameters.items()}
        sampler = optuna.samplers.TPESampler(seed=sweep.seed, n_startup_trials=min(10, max(2, sweep.trials // 4)))
        self.study = optuna.create_study(direction=sweep.direction, sampler=sampler)
        self.asked, self.redo = {}, []
        for i in range(sweep.trials):
            r = read_trial(trial_dir(sweep, i))
            if r is None or r["status"] == "running" or (r["status"] == "failed" and retry_failed):
                self.redo.append((i, r["keys"] if r else None))
            else:
                state = optuna.trial.TrialState.COMPLETE if r.get("metric") is not None else None
                self.study.add_trial(
                    optuna.trial.create_trial(
                        params=self._params(r["keys"]),
                        distributions=self.dists,
                        value=r.get("metric"),
                        state=state or optuna.trial.TrialState.FAIL,
                    )
                )

    def _params(self, keys: dict) -> dict:
        p = self.sweep.parameters
        return {k: p[k]["values"].index(v) if "values" in p[k] else v for k, v in keys.items()}

    def next(self):
        if not self.redo:
            return None
        i, keys = self.redo.pop(0)
        if keys is not None:
            self.study.enqueue_trial(self._params(keys))
        trial = self.study.ask(self.dists)
        p = self.sweep.parameters
        self.asked[i] = trial
        return i, {k: p[k]["values"][v] if "values" in p[k] else v for k, v in trial.params.items()}

    def tell(self, i: int, record: dict) -> None:
        if record["status"] == "done" and record.get("metric") is not None:
            self.study.tell(self.asked.pop(i), record["metric"])
        else:
            self.study.tell(self.asked.pop(i), state=self.optuna.trial.TrialState.FAIL)


def _distribution(optuna, p: dict):
    if "values" in p:
        return optuna.distributions.CategoricalDistribution(list(range(len(p["values"]))))
    if p["int"]:
        return optuna.distributions.IntDistribution(int(p["min"]), int(p["max"]), log=p["log"])
    return optuna.distributions.FloatDistribution(float(p["min"]), float(p["max"]), log=p["log"])


# ---- SLURM ----


def write_slurm(sweep: Sweep, parallel: int = 0) -> Path:
    """DIR/sweep.sbatch: a SLURM array whose task i runs trial i (`qwen3lab sweep FILE --trial i`)."""
    if sweep.method == "tpe":
        raise ConfigError(f"{sweep.file}: --slurm runs a planned array; TPE asks after each trial (grid or random)")
    n = len(planned_trials(sweep))
    save_sweep_json(sweep)
    limit = f"%{parallel}" if parallel else ""
    python, file, out = sys.executable, sweep.file.resolve(), sweep.out.resolve()
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=qwen3lab-{sweep.file.stem}",
        f"#SBATCH --array=0-{n - 1}{limit}",
        f"#SBATCH --output={out}/slurm-%a.out",
        *[f"#SBATCH {x}" for x in sweep.slurm],
        "set -euo pipefail",
        f"cd '{Path.cwd()}'",
        f"'{python}' -m qwen3lab sweep '{file}' --trial \"$SLURM_ARRAY_TASK_ID\"",
    ]
    script = sweep.out / "sweep.sbatch"
    script.write_text("\n".join(lines) + "\n")
    return script
