"""Host memory per rank under torchrun + FSDP2 on the CPU: load, one step of full fine-tuning, export.

    python bench/fsdp_memory.py [--shape qwen3-0.6b-base] [--worlds 1,2]

A random-weight model of the shape saved in bf16 (as Qwen3 checkpoints are), a few short chats; for each world
size, `qwen3lab train` under torchrun (gloo) for one step with the export at the end. Each rank reports its RSS
before the model is built and its peak once the model is loaded and sharded, after the step, and after the export
(the whole run); printed per rank, with the growth per parameter the rank holds (parameters / world).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from common import machine


def child(folder: Path) -> None:
    """One rank: `qwen3lab train` with RSS recorded before the model is built and once it is loaded."""
    T = importlib.import_module("qwen3lab.train.build")
    L = importlib.import_module("qwen3lab.train.loop")
    marks = {}

    def rss_now():
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    build_model, build_optimizer = T.build_model, T.build_optimizer

    def measured_build_model(*a, **k):
        marks.setdefault("before", rss_now())
        return build_model(*a, **k)

    def measured_build_optimizer(*a, **k):
        marks.setdefault("loaded", peak())
        return build_optimizer(*a, **k)

    def measured(export):
        def run(*a, **k):
            marks.setdefault("trained", peak())
            return export(*a, **k)

        return run

    T.build_model, T.build_optimizer = measured_build_model, measured_build_optimizer
    L.export, L.export_sharded = measured(L.export), measured(L.export_sharded)
    from qwen3lab.cli import main

    main(["train", str(folder / "run.yaml"), "--out", str(folder / f"run-{os.environ['WORLD_SIZE']}")])
    marks["run"] = peak()
    (folder / f"rss-{os.environ['WORLD_SIZE']}-{os.environ['RANK']}.json").write_text(json.dumps(marks))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b-base")
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--folder", default="/tmp/qwen3lab-bench-fsdp")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = Path(args.folder)
    if args.child:
        child(folder)
        return

    import torch

    import qwen3lab

    print(machine())
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "model" / "config.json").is_file():
        model = qwen3lab.new_model(qwen3lab.preset(args.shape), seed=0)
        qwen3lab.save_model(model, folder / "model", dtype=torch.bfloat16)
        qwen3lab.load_tokenizer().save(folder / "model")
        del model
    with torch.device("meta"):
        params = sum(p.numel() for p in qwen3lab.Qwen3(qwen3lab.preset(args.shape)).parameters())
    chats = [
        {"messages": [{"role": "user", "content": f"{a} + {b}?"}, {"role": "assistant", "content": str(a + b)}]}
        for a in range(4)
        for b in range(4)
    ]
    (folder / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    config = {
        "model": str(folder / "model"),
        "data": {"train": str(folder / "chats.jsonl"), "eval_fraction": 0},
        "steps": 1,
        "batch_size": 2,
        "progress": False,
        "resume": False,
    }
    (folder / "run.yaml").write_text(json.dumps(config))
    print(
        f"{args.shape}: {params / 1e9:.2f} B parameters, bf16 checkpoint ({params * 2 / 2**30:.2f} GiB; fp32 "
        f"{params * 4 / 2**30:.2f} GiB); full fine-tuning, AdamW, 1 step of 2 rows per rank, export"
    )
    for world in [int(w) for w in args.worlds.split(",")]:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // world))}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(world),
            __file__,
            "--child",
            "--folder",
            str(folder),
        ]
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, cwd=Path(__file__).parent)
        for rank in range(world):
            m = json.loads((folder / f"rss-{world}-{rank}.json").read_text())
            m.setdefault("trained", m["run"])  # (a rank that does not export)
            share = params / world
            grown = {k: (m[k] - m["before"]) / share for k in ("loaded", "trained", "run")}
            print(
                f"world {world} rank {rank}: before {m['before'] / 2**30:.2f} GiB; peak after load "
                f"{m['loaded'] / 2**30:.2f} GiB (+{grown['loaded']:.1f} B/param), after the step "
                f"{m['trained'] / 2**30:.2f} GiB (+{grown['trained']:.1f}), after the export {m['run'] / 2**30:.2f} "
                f"GiB (+{grown['run']:.1f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
