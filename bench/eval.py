"""lm-evaluation-harness on one task set: its `hf` backend vs qwen3lab's in-process model type, same weights.

    python bench/eval.py [--shape qwen3-0.6b-base] [--mc 100] [--gen 100] [--gen-tokens 16] [--hf-batch 16]

A random-weight model of the shape (fp32, saved once by qwen3lab with its tokenizer), two local tasks: a
multiple-choice task of --mc documents x 4 choices (log-likelihoods) and a generate_until task of --gen documents,
greedy, up to --gen-tokens tokens. Each system runs lm_eval.simple_evaluate in its own process (wall time includes
loading the model; the heap setting qwen3lab makes is process-wide); the scores must come out identical and the
per-choice log-likelihoods within 1e-4. Prints both times, the ratio, and the score check.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from common import WORDS, machine


def write_tasks(folder: Path, n_mc: int, n_gen: int, gen_tokens: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    phrases = list(
        dict.fromkeys(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(4 * n_mc))
    )
    mc = []  # the right answer and three other phrases reversed: four different texts, so no exact ties
    for i, p in enumerate(phrases[:n_mc]):
        others = rng.sample(phrases[:i] + phrases[i + 1 :], 3)
        choices = [" ".join(reversed(c.split())) for c in [p, *others]]
        mc.append({"text": p, "choices": choices, "label": 0})
    gen = [{"text": p, "answer": " ".join(reversed(p.split()))} for p in phrases[:n_gen]]
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: 'Reverse the words: {{text}}\\nAnswer:'\n"
    for name, rows in (("mc", mc), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "bench_mc.yaml").write_text(
        f"task: bench_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "bench_gen.yaml").write_text(
        f"task: bench_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
        f"generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: {gen_tokens}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )


def run_one(system: str, folder: Path, hf_batch: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    if system == "hf":
        model, args = "hf", f"pretrained={folder / 'model'},dtype=float32,batch_size={hf_batch}"
    else:
        from qwen3lab.eval.lm_eval_model import Qwen3LabLM

        model, args = Qwen3LabLM(pretrained=str(folder / "model"), dtype="float32", device="cpu"), None
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=args,
        tasks=["bench_mc", "bench_gen"],
        device="cpu",
        task_manager=TaskManager(include_path=str(folder)),
        log_samples=True,
    )
    seconds = time.perf_counter() - t0
    samples = {t: [s["resps"] for s in sorted(v, key=lambda s: s["doc_id"])] for t, v in out["samples"].items()}
    scores = {t: {k: v for k, v in r.items() if "stderr" not in k and k != "alias"} for t, r in out["results"].items()}
    return {"seconds": seconds, "scores": scores, "samples": samples}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b-base")
    ap.add_argument("--mc", type=int, default=100)
    ap.add_argument("--gen", type=int, default=100)
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--folder", default="/tmp/qwen3lab-bench-eval")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = Path(args.folder)
    if args.one:  # a child process: one system, its result as JSON in a file
        result = run_one(args.one, folder, args.hf_batch)
        (folder / f"{args.one}.json").write_text(json.dumps(result))
        return

    import qwen3lab

    print(machine())
    print(
        f"lm-eval {args.shape} (random weights, fp32): {args.mc} multiple-choice docs x 4 choices, {args.gen} "
        f"greedy generations of <= {args.gen_tokens} tokens; hf batch_size {args.hf_batch}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "model" / "config.json").is_file():
        model = qwen3lab.new_model(qwen3lab.preset(args.shape), seed=0).float()
        qwen3lab.save_model(model, folder / "model")
        qwen3lab.load_tokenizer().save(folder / "model")
        del model
    write_tasks(folder, args.mc, args.gen, args.gen_tokens)
    results = {}
    for system in ("hf", "qwen3lab"):
        cmd = [sys.executable, __file__, "--one", system, "--folder", str(folder), "--hf-batch", str(args.hf_batch)]
        subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parent)
        results[system] = json.loads((folder / f"{system}.json").read_text())
        print(f"{system:9s} {results[system]['seconds']:7.1f} s  {results[system]['scores']}", flush=True)
    hf, ours = results["hf"], results["qwen3lab"]
    worst = 0.0
    for want, got in zip(hf["samples"]["bench_mc"], ours["samples"]["bench_mc"], strict=True):
        worst = max(worst, *(abs(w[0][0] - g[0][0]) for w, g in zip(want, got, strict=True)))
    same_text = hf["samples"]["bench_gen"] == ours["samples"]["bench_gen"]
    print(
        f"qwen3lab / hf: {hf['seconds'] / ours['seconds']:.2f}x faster; scores identical: "
        f"{hf['scores'] == ours['scores']}; generations identical: {same_text}; "
        f"largest log-likelihood difference {worst:.2e}"
    )


if __name__ == "__main__":
    main()
