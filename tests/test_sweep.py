"""Sweeps and scaling laws: `qwen3lab sweep` (grid, random, TPE; failing trials; resume; SLURM), `sweep report`, and
the Chinchilla fit of `qwen3lab scaling` on losses drawn from a known law."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from qwen3lab.cli import main
from qwen3lab.model.config import ConfigError, preset
from qwen3lab.sweep import runner
from qwen3lab.sweep.report import load_report
from qwen3lab.sweep.scaling import Law, bootstrap, fit_law, interval, optimum_law

TRUE = Law(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)  # Hoffmann et al.'s fit, as a known law


def _law_points(noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    N = np.repeat(np.geomspace(1e6, 3e8, 6), 4)
    D = np.tile(np.geomspace(1e8, 1e10, 4), 6)
    return N, D, TRUE(N, D) * np.exp(rng.normal(0, noise, len(N)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_the_exponents_of_a_known_law(seed):
    N, D, L = _law_points(0.005, seed)
    law, theta = fit_law(N, D, L)
    boots = bootstrap(N, D, L, theta, samples=100, seed=seed)
    for name, tol in (("alpha", 0.03), ("beta", 0.03), ("E", 0.1)):
        lo, hi = interval([getattr(b, name) for b in boots], 0.99)
        assert lo <= getattr(TRUE, name) <= hi, (name, lo, hi)
        assert abs(getattr(law, name) - getattr(TRUE, name)) < tol, (name, getattr(law, name))
    assert np.allclose(law(N, D), L, rtol=0.02)
    # without noise the fit is the law
    exact, _ = fit_law(N, D, TRUE(N, D))
    assert abs(exact.alpha - TRUE.alpha) < 2e-3 and abs(exact.beta - TRUE.beta) < 2e-3


def test_the_optimal_learning_rate_law_is_recovered():
    """Losses a parabola in log(lr) around lr* = 0.3 N^-0.25: the fitted exponent is -0.25 from a grid of 5 rates."""
    rows = []
    for n in (1e5, 1e6, 1e7, 1e8):
        best = 0.3 * n**-0.25
        for lr in np.geomspace(best / 4, best * 4, 5) * 1.3:  # the grid is not centred on the optimum
            loss = 2.0 + 0.1 * np.log(lr / best) ** 2
            rows.append(
                {"status": "done", "metric": loss, "tokens": 1000, "parameters_non_embedding": n, "optim.lr": lr}
            )
    law = optimum_law(rows, "optim.lr")
    assert abs(law["k"] + 0.25) < 1e-6 and abs(np.exp(law["c"]) - 0.3) < 1e-4, law
    assert not any(p["at_edge"] for p in law["points"])


def _synthetic_sweep(folder: Path, sizes=(32, 64, 96, 128, 160), steps=(50, 150)) -> None:
    """A sweep folder as `qwen3lab sweep` writes it, its losses drawn from TRUE (no training)."""
    folder.mkdir(parents=True)
    params = {"model_config": [{"hidden_size": h} for h in sizes], "steps": list(steps)}
    spec = {"metric": "eval_loss", "direction": "minimize", "method": "grid", "parameters": params}
    (folder / "sweep.json").write_text(json.dumps(spec))
    for i, (h, s) in enumerate((h, s) for h in sizes for s in steps):
        n = preset("tiny", hidden_size=h).num_parameters(embedding=False)
        record = {"trial": i, "keys": {"model_config": {"hidden_size": h}, "steps": s}, "status": "done"}
        record |= {"parameters": n + 151936 * h, "parameters_non_embedding": n, "tokens": s * 1000, "seconds": 1.0}
        loss = float(TRUE(n * 1000, s * 1e6))
        record |= {"metric": loss, "best": loss, "steps": s}
        (folder / f"trial-{i:03d}").mkdir()
        (folder / f"trial-{i:03d}" / "trial.json").write_text(json.dumps(record))
        cfg = {"model": "tiny", "model_config": {"hidden_size": h}, "steps": s}
        (folder / f"trial-{i:03d}" / "trial.yaml").write_text(yaml.safe_dump(cfg))


def test_scaling_command_fits_prints_and_predicts(tmp_path, capsys):
    _synthetic_sweep(tmp_path / "sweep")
    main(["scaling", str(tmp_path / "sweep"), "--target", "{hidden_size: 256}", "--bootstrap", "20"])
    out = capsys.readouterr().out
    assert "10 points (5 sizes x 2 token budgets)" in out and "target {hidden_size: 256}" in out
    saved = json.loads((tmp_path / "sweep" / "scaling.json").read_text())
    n = preset("tiny", hidden_size=256).num_parameters(embedding=False)
    assert saved["prediction"]["N"] == n
    assert (tmp_path / "sweep" / "scaling.png").stat().st_size > 10_000


def test_scaling_refuses_a_sweep_without_two_sizes_and_budgets(tmp_path):
    _synthetic_sweep(tmp_path / "sweep", sizes=(64,), steps=(50, 150))
    with pytest.raises(SystemExit, match="needs finished trials at >= 2 model sizes"):
        main(["scaling", str(tmp_path / "sweep")])


# ---- sweeps that train ----

CHATS = [
    {"messages": [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]}
    for a in range(20)
    for b in range(5)
]


@pytest.fixture
def sweep_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    Path("bad.jsonl").write_text('{"messages": 5}\n')
    base = {"model": "tiny", "steps": 2, "batch_size": 2, "optim": {"lr": 1e-3}}
    base["data"] = {"train": "chats.jsonl", "eval_fraction": 0.1, "max_length": 64}
    Path("base.yaml").write_text(yaml.safe_dump(base))
    return tmp_path


def _write_sweep(parameters: dict, **keys) -> Path:
    spec = {"base": "base.yaml", "out": "out", "parameters": parameters} | keys
    Path("sweep.yaml").write_text(yaml.safe_dump(spec))
    return Path("sweep.yaml")


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(sweep_dir, capsys):
    _write_sweep({"data.train": ["bad.jsonl", "chats.jsonl"], "model_config": [{"hidden_size": 32}, {"nope": 1}]})
    main(["sweep", "sweep.yaml", "--parallel", "2"])
    records = {r["trial"]: r for r in runner.all_trials(Path("out"))}
    assert [records[i]["status"] for i in range(4)] == ["failed", "failed", "done", "failed"]
    assert "bad.jsonl:1" in records[0]["error"]  # the trial's own one-line error
    assert "model_config: nope not among" in records[1]["error"]  # refused before it ran: no log
    assert not (Path("out") / "trial-001" / "log.txt").exists()
    done = records[2]
    assert done["metric"] > 0 and done["tokens"] > 0 and done["steps"] == 2
    # parameter counts are exact: the exported model's own tensors, as transformers loads them
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(Path("out") / "trial-002" / "model")
    assert done["parameters"] == sum(p.numel() for p in model.parameters())
    assert model.config.hidden_size == 32
    table = capsys.readouterr().out
    assert "trial 000 failed: " in table and "done" in table
    spec, rows = load_report("out")
    assert rows[0]["trial"] == 2 and len(rows) == 4  # finished first
    assert (Path("out") / "report.csv").read_text().count("\n") == 5 and Path("out/report.png").is_file()


def test_bad_sweep_files_are_refused_before_anything_runs(sweep_dir):
    cases = [
        ({"optim.lrr": [1e-3]}, {}, "did you mean optim.lr"),
        ({"optim.lr": {"min": 1e-4, "max": 1e-2}}, {}, "a range needs method random or tpe"),
        ({"optim.lr": {"min": 0, "max": 1, "log": True}}, {"method": "random", "trials": 2}, "0 < min < max"),
        ({"optim.lr": [1e-3]}, {"method": "random"}, "needs how many trials"),
        ({"optim.lr": [1e-3]}, {"method": "bayes"}, "method 'bayes' is not one of"),
        ({"optim.lr": [1e-3]}, {"config": {"data": {"eval_fraction": 0.0}}}, "metric eval_loss needs held-out data"),
        ({"optim.lr": [1e-3]}, {"metrics": "loss"}, "unknown keys ['metrics']"),
    ]
    for parameters, keys, message in cases:
        _write_sweep(parameters, **keys)
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            runner.load_sweep("sweep.yaml")
    assert not Path("out").exists()


def test_random_draws_are_the_same_on_a_rerun(sweep_dir):
    lr = {"min": "1e-4", "max": 1e-2, "log": True}  # as YAML reads 1e-4: a string
    _write_sweep({"optim.lr": lr, "batch_size": [1, 2]}, method="random", trials=5)
    first = runner.planned_trials(runner.load_sweep("sweep.yaml"))
    assert first == runner.planned_trials(runner.load_sweep("sweep.yaml")) and len(first) == 5
    assert all(1e-4 <= t["optim.lr"] <= 1e-2 for t in first) and len({t["optim.lr"] for t in first}) == 5


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_redoing_finished_trials(sweep_dir):
    _write_sweep({"optim.lr": [1e-3, 2e-3, 3e-3]})
    cmd = [sys.executable, "-m", "qwen3lab", "sweep", "sweep.yaml", "--parallel", "1"]
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.time() + 300
    while (runner.read_trial(Path("out/trial-001")) or {}).get("status") != "running":
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its running trial, as a lost job would be
    proc.wait()
    first = (Path("out") / "trial-000" / "metrics.jsonl").stat().st_mtime_ns
    assert runner.read_trial(Path("out/trial-000"))["status"] == "done"
    subprocess.run(cmd, check=True)
    assert (Path("out") / "trial-000" / "metrics.jsonl").stat().st_mtime_ns == first  # not run again
    assert [r["status"] for r in runner.all_trials(Path("out"))] == ["done"] * 3
    subprocess.run(cmd, check=True)  # all finished: nothing runs
    assert (Path("out") / "trial-000" / "metrics.jsonl").stat().st_mtime_ns == first


@pytest.mark.slow
def test_the_slurm_array_runs_each_trial(sweep_dir):
    _write_sweep({"optim.lr": [1e-3, 3e-3]}, slurm=["--gres=gpu:1", "--time=00:30:00"])
    main(["sweep", "sweep.yaml", "--slurm", "--parallel", "1"])
    script = Path("out") / "sweep.sbatch"
    text = script.read_text()
    assert "#SBATCH --array=0-1%1" in text and "#SBATCH --gres=gpu:1" in text
    for task in range(2):  # each array task as SLURM would start it: the script with its task id
        subprocess.run(["bash", str(script)], check=True, env=os.environ | {"SLURM_ARRAY_TASK_ID": str(task)})
    records = runner.all_trials(Path("out"))
    assert [(r["trial"], r["status"], r["keys"]["optim.lr"]) for r in records] == [(0, "done", 1e-3), (1, "done", 3e-3)]


@pytest.mark.slow
def test_tpe_asks_optuna_for_each_trial(sweep_dir):
    pytest.importorskip("optuna")
    _write_sweep({"optim.lr": {"min": 1e-4, "max": 1e-2, "log": True}, "batch_size": [1, 2]}, method="tpe", trials=3)
    with pytest.raises(ConfigError, match="--slurm runs a planned array"):
        runner.write_slurm(runner.load_sweep("sweep.yaml"))
    main(["sweep", "sweep.yaml", "--parallel", "2"])
    records = runner.all_trials(Path("out"))
    assert [r["status"] for r in records] == ["done"] * 3
    assert all(1e-4 <= r["keys"]["optim.lr"] <= 1e-2 and r["keys"]["batch_size"] in (1, 2) for r in records)


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_sweeps_are_valid(path):
    """Each sweep in configs/sweeps/ loads and every trial's config passes the check (nothing runs)."""
    sweep = runner.load_sweep(path)
    trials = runner.planned_trials(sweep)
    assert len(trials) > 1
    for keys in trials:
        runner.check_train_config(runner.trial_config(sweep, keys, Path("unused")))
