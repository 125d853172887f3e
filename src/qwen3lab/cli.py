"""The `qwen3lab` command. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def cmd_info(args) -> None:
    """Print a model's config and parameter counts (a folder or a preset name)."""
    from .model.config import PRESETS, ModelConfig, preset

    cfg = preset(args.model) if args.model in PRESETS else ModelConfig.from_file(args.model)
    for key, value in cfg.to_hf_dict().items():
        print(f"{key:28} {value}")
    print(f"{'parameters':28} {cfg.num_parameters():,} ({cfg.num_parameters(embedding=False):,} outside the embedding)")
    if cfg.num_experts:
        print(f"{'active parameters':28} {cfg.num_parameters(active=True):,} per token")


def cmd_smoke(args) -> None:
    """Build a small random Qwen3, run a forward pass, save it as an HF folder and load it back."""
    import torch

    from .model.config import preset
    from .model.hf import load_model, new_model, save_model

    cfg = preset(args.preset)
    t0 = time.perf_counter()
    model = new_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq_len))
    with torch.no_grad():
        logits = model(ids)
    print(f"{args.preset}: {cfg.num_parameters():,} parameters, logits {tuple(logits.shape)}")
    save_model(model, args.out)
    with torch.no_grad():
        again = load_model(args.out, dtype="float32", device="cpu")(ids)
    same = torch.equal(again, logits)
    print(f"saved to {args.out} and loaded back: logits {'identical' if same else 'DIFFER'}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    if not same:
        sys.exit(1)


def cmd_train(args, extra: list[str]) -> None:
    """Supervised fine-tuning from a YAML config, with any key overridden as --section.key value."""
    from .model.config import ConfigError
    from .train import train
    from .train.config import config_keys, load_train_config

    overrides = {k: getattr(args, k) for k in config_keys() if getattr(args, k, None) is not None}
    for flag in extra:  # anything argparse did not know: let the config say what is near
        if flag.startswith("--"):
            raise ConfigError(f"{flag}: " + _near_key_message(flag[2:].split("=")[0]))
    cfg = load_train_config(args.config, overrides)
    run = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the job
        print(f"run folder: {run}")


def _near_key_message(key: str) -> str:
    from .model.config import ConfigError
    from .train.config import TrainConfig, set_key

    try:
        set_key(TrainConfig(), key, None)
    except ConfigError as e:
        return str(e)
    return "not a config key"


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One --flag per config key (dotted for sections), so YAML keys and flags never drift apart."""
    from .train.config import config_keys

    for key, kind in config_keys().items():
        p.add_argument(f"--{key}", dest=key, default=None, metavar=kind.__name__.upper())


def _load_for_inference(args):
    from .model.hf import load_model
    from .model.runtime import prepare_for_inference
    from .text.tokenizer import load_tokenizer

    model = load_model(args.model, dtype=args.dtype, device=args.device)
    prepare_for_inference(model, args.compile)
    tok = load_tokenizer(args.model) if (Path(args.model) / "tokenizer.json").is_file() else load_tokenizer()
    draft = args.draft_model and load_model(args.draft_model, dtype=args.dtype, device=args.device)
    return model, tok, {"speculate": args.speculate, "draft_model": draft or None}  # how to decode: Engine's keys


def _sampling(args, **extra):
    from .infer.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        **extra,
    )


def cmd_generate(args) -> None:
    """Generate from a prompt (as a user message through the chat template, or --raw text), streamed."""
    from .generate import stream

    model, tok, spec = _load_for_inference(args)
    if args.raw:
        prompt = args.prompt
    else:
        messages = [{"role": "user", "content": args.prompt}]
        thinking = False if args.no_think else None
        prompt = tok.encode_chat(messages, add_generation_prompt=True, enable_thinking=thinking, assistant_mask=False)
        prompt = prompt.input_ids
    params = _sampling(args)
    if args.json_schema is not None:  # a file or the JSON itself
        from .infer import grammar

        given = args.json_schema
        try:
            schema = json.loads(given if given.lstrip().startswith("{") else Path(given).read_text())
            held = grammar.Constraint(tok, grammar.json_schema(schema), model.config.vocab_size)
        except ValueError as e:  # not JSON, or not a schema llguidance takes
            raise ValueError(f"--json-schema: {e}") from None
        params.constraint = held
    for piece in stream(model, tok, prompt, params, **spec):
        print(piece, end="", flush=True)
    print()


DIM, RESET = "\033[2m", "\033[0m"


def cmd_chat(args) -> None:
    """Interactive chat that keeps history through the template. /think /no_think /reset /system TEXT /save FILE"""
    from .generate import stream
    from .text.chat import parse_assistant

    model, tok, spec = _load_for_inference(args)
    system, history, thinking = None, [], not args.no_think
    print("qwen3lab chat — /think, /no_think, /reset, /system TEXT, /save FILE, /exit")
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd == "/exit":
                return
            elif cmd in ("/think", "/no_think"):
                thinking = cmd == "/think"
                print(f"(thinking {'on' if thinking else 'off'})")
            elif cmd == "/reset":
                history = []
                print("(history cleared)")
            elif cmd == "/system":
                system = rest or None
                print(f"(system prompt {'set' if system else 'cleared'})")
            elif cmd == "/save":
                path = Path(rest or "chat.json")
                messages = ([{"role": "system", "content": system}] if system else []) + history
                path.write_text(json.dumps({"messages": messages}, indent=2, ensure_ascii=False) + "\n")
                print(f"(saved {len(messages)} messages to {path})")
            else:
                print(f"(unknown command {cmd})")
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids = tok.encode_chat(messages, add_generation_prompt=True, enable_thinking=thinking, assistant_mask=False)
        print("assistant> ", end="", flush=True)
        text, in_think = "", False
        for piece in stream(model, tok, ids.input_ids, _sampling(args), **spec):
            text += piece
            if "<think>" in piece:
                in_think = True
            print((DIM if in_think else "") + piece + (RESET if in_think else ""), end="", flush=True)
            if "</think>" in piece:
                in_think = False
        print()
        reply = parse_assistant(text)
        history.append({k: v for k, v in reply.items() if v is not None and k != "malformed_tool_calls"})


def cmd_serve(args) -> None:
    """OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, /health, the chat page at /."""
    from .serve import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        dtype=args.dtype,
        compile=args.compile,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        prefix_cache_tokens=args.prefix_cache_tokens,
        api_key=args.api_key,
        prefill_chunk=args.prefill_chunk,
        speculate=args.speculate,
        draft_model_dir=args.draft_model,
    )


def cmd_demo(args) -> None:
    """Train a small Qwen3 from scratch on built-in chat tasks and show held-out accuracy before and after."""
    from .demo import DEFAULT_TASKS, TASKS, run_demo

    tasks = args.tasks.split(",") if args.tasks else list(DEFAULT_TASKS)
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise SystemExit(f"qwen3lab demo: unknown task(s) {sorted(unknown)}; choose from {', '.join(TASKS)}")
    if args.rl:
        from .demo import run_rl_demo

        run_rl_demo(out=args.out if args.out != "runs/demo" else "runs/demo-rl", seed=args.seed)
        return
    if args.moe:
        from .demo_moe import run_moe_demo

        out = args.out if args.out != "runs/demo" else "runs/demo-moe"
        run_moe_demo(out=out, steps=args.steps or 200, seed=args.seed)
        return
    if args.scaling:
        from .demo_scaling import run_scaling_demo

        run_scaling_demo(out=args.out if args.out != "runs/demo" else "runs/demo-scaling", seed=args.seed)
        return
    if args.distill:
        from .demo_distill import run_distill_demo

        out = args.out if args.out != "runs/demo" else "runs/demo-distill"
        run_distill_demo(out=out, steps=args.steps or 600, teacher=args.model, seed=args.seed)
        return
    run_demo(out=args.out, steps=args.steps, tasks=tasks, model_dir=args.model, seed=args.seed)


def cmd_eval(args) -> None:
    """Score a model (and a --baseline) on a data file and / or lm-evaluation-harness tasks; a table and JSON."""
    from .eval.evaluation import run_eval

    run_eval(
        args.model,
        args.baseline,
        args.data,
        [t for t in args.tasks.split(",") if t],
        args.out,
        args.rewards,
        args.max_new_tokens,
        include_path=args.include_path,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        dtype=args.dtype,
    )


def cmd_prepare(args) -> None:
    """Tokenise data files into memory-mapped shards that training reads as they are (--data.train DIR)."""
    from .train.prepare import describe, prepare

    t0 = time.perf_counter()
    kw = dict(workers=args.workers, max_length=args.max_length, skip_bad=args.skip_bad)
    manifest = prepare(args.files, args.out, args.model, rows_per_shard=args.rows_per_shard, **kw)
    print(f"{args.out}: {describe(manifest)} ({time.perf_counter() - t0:.1f}s)")


def cmd_sweep(args) -> None:
    """Run a sweep file's trials, each a run folder (`qwen3lab sweep report DIR`: every trial's table and plots)."""
    from .sweep import runner
    from .sweep.report import report

    if args.args[0] == "report":
        if len(args.args) != 2:
            raise SystemExit("qwen3lab sweep report: give the sweep's folder, e.g. qwen3lab sweep report runs/sweep")
        print(report(args.args[1]))
        print(f"written: {Path(args.args[1]) / 'report.csv'}, report.json, report.png")
        return
    if len(args.args) != 1:
        raise SystemExit("qwen3lab sweep: give one sweep file (or: qwen3lab sweep report DIR)")
    sweep = runner.load_sweep(args.args[0])
    if args.slurm:
        script = runner.write_slurm(sweep, args.parallel)
        print(f"{script}: submit with sbatch {script}; then qwen3lab sweep report {sweep.out}")
    elif args.trial is not None:
        runner.run_one(sweep, args.trial)
    else:
        runner.run_sweep(sweep, args.parallel, args.retry_failed)
        print(report(sweep.out))


def cmd_scaling(args) -> None:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to a sweep over model sizes and token budgets; predict a target."""
    from .sweep.scaling import run_scaling

    run_scaling(args.dir, args.target, args.tokens, args.params, args.bootstrap)


def cmd_compare(args) -> None:
    """A table of runs' final metrics and one PNG overlaying their loss curves."""
    from .sweep.report import compare_runs

    compare_runs(args.runs, args.png)


def _add_inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model folder (e.g. runs/demo/model)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-think", action="store_true", help="enable_thinking=False: an empty think block")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--speculate", type=int, default=0, help=SPECULATE_HELP)
    p.add_argument("--draft-model", default=None, help=DRAFT_HELP)


COMPILE_HELP = "torch.compile the decoder blocks: compiles once (seconds), then decodes faster"
SPECULATE_HELP = (
    "speculative decoding: up to this many draft tokens a step, looked up in the prompt and output (0: off)"
)
DRAFT_HELP = "speculative decoding with this draft model (a smaller Qwen3, same tokenizer): --speculate drafts (4)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help=cmd_info.__doc__)
    p.add_argument("model", help="model folder or preset name (qwen3-4b-base, tiny, ...)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("smoke", help=cmd_smoke.__doc__)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--out", default="runs/smoke")
    p.set_defaults(func=cmd_smoke)

    p = sub.add_parser("train", help=cmd_train.__doc__)
    p.add_argument("config", nargs="?", help="YAML config file (keys as in configs/*.yaml)")
    _add_config_flags(p)
    p.set_defaults(func=cmd_train, takes_extra=True)

    p = sub.add_parser("generate", help=cmd_generate.__doc__)
    _add_inference_flags(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, not as a chat message")
    p.add_argument("--json-schema", default=None, help="hold the output to this JSON schema (a file, or the JSON)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help=cmd_chat.__doc__)
    _add_inference_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo", help=cmd_demo.__doc__)
    p.add_argument("--steps", type=int, default=None, help="default: configs/demo.yaml's steps")
    p.add_argument("--tasks", default="", help="comma-separated from add,max,reverse,sort,tool (default: all but add)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--model", default=None, help="fine-tune this HF folder instead of a small model from scratch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rl", action="store_true", help="the RL stage: a short SFT, then GRPO lifting a held-out task")
    p.add_argument("--moe", action="store_true", help="a tiny Qwen3 MoE trained with global and with micro balancing")
    p.add_argument(
        "--distill",
        action="store_true",
        help="distil the demo's model (or --model) into a student of half its width: SFT vs off- vs on-policy",
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="a scaling law from 30 small runs (a sweep), checked on a larger shape held out of the fit",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help=cmd_eval.__doc__)
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--baseline", default=None, help="another HF model folder, scored beside it")
    p.add_argument("--data", default=None, help="JSONL / JSON / Parquet: loss, perplexity, generation-scored metrics")
    p.add_argument(
        "--rewards",
        nargs="*",
        default=None,
        help="scorers of the generations: built-ins (exact_match, think_format, tool_call_json) or "
        "module:function (default: exact_match when rows have an answer)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--tasks", default="", help="comma-separated lm-eval tasks, run in-process")
    p.add_argument("--include-path", default=None, help="folder of your own lm-eval task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: documents per task at most")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default=None, help="write results and every generation as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("prepare", help=cmd_prepare.__doc__)
    p.add_argument("files", nargs="+", help="JSONL / JSON / Parquet files or datasets folders")
    p.add_argument("--out", required=True, help="the prepared folder (a stopped run continues where it stopped)")
    p.add_argument("--model", default=None, help="its tokenizer and chat template (default: the built-in Qwen3 ones)")
    p.add_argument("--workers", type=int, default=None, help="tokenising processes (default: the cores)")
    p.add_argument("--max-length", type=int, default=2048, help="examples other than text cut at this many tokens")
    p.add_argument("--skip-bad", action="store_true", help="leave bad rows out (counted, listed) instead of stopping")
    p.add_argument("--rows-per-shard", type=int, default=4096, help="rows tokenised into each shard")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("compare", help=cmd_compare.__doc__)
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--png", default="compare.png")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help=cmd_sweep.__doc__)
    p.add_argument("args", nargs="+", metavar="FILE | report DIR", help="a sweep file (docs/sweeps.md)")
    p.add_argument("--parallel", type=int, default=0, help="trials at once (default: one per GPU, else one)")
    p.add_argument("--slurm", action="store_true", help="write DIR/sweep.sbatch, a SLURM array of the trials")
    p.add_argument("--trial", type=int, default=None, help="run this one trial (what a SLURM array task runs)")
    p.add_argument("--retry-failed", action="store_true", help="run failed trials again (else a rerun skips them)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("scaling", help=cmd_scaling.__doc__)
    p.add_argument("dir", help="a sweep's folder: trials over model sizes (model_config) and token budgets (steps)")
    p.add_argument("--target", default=None, help="predict for a preset (qwen3-0.6b), a model folder or a model_config")
    p.add_argument("--tokens", type=float, default=None, help="its training tokens (default: the sweep's most)")
    p.add_argument("--params", choices=("non_embedding", "total"), default="non_embedding", help="what N counts")
    p.add_argument("--bootstrap", type=int, default=200, help="refits on resampled points, for the intervals")
    p.set_defaults(func=cmd_scaling)

    p = sub.add_parser("serve", help=cmd_serve.__doc__)
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting at most; more get 503 + Retry-After")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take at most")
    p.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=8192,
        help="prompt tokens whose cache is kept for later requests that begin the same way (0: off)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="prompt tokens prefilled per engine step at most, in one forward with the running rows' next tokens",
    )
    p.add_argument("--speculate", type=int, default=0, help=SPECULATE_HELP)
    p.add_argument("--draft-model", default=None, help=DRAFT_HELP)
    p.add_argument(
        "--api-key",
        default=os.environ.get("QWEN3LAB_API_KEY"),
        help="every route but / and /health needs 'Authorization: Bearer KEY' (default: $QWEN3LAB_API_KEY)",
    )
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.set_defaults(func=cmd_serve)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", help="on an error, the traceback too (or QWEN3LAB_DEBUG=1)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args, extra = build_parser().parse_known_args(argv)
    try:
        if getattr(args, "takes_extra", False):
            args.func(args, extra)
        elif extra:
            raise SystemExit(f"qwen3lab {args.command}: unrecognized arguments: {' '.join(extra)}")
        else:
            args.func(args)
    except (ValueError, OSError) as e:
        # Bad input (a config, data, model or checkpoint a user gave): one line that names the file / key / example
        # and the fix, not a traceback. qwen3lab's own refusals are ValueErrors (ConfigError, DataError,
        # CheckpointError, ...) or OSErrors (a missing file); QWEN3LAB_DEBUG=1 or --debug shows the traceback.
        if args.debug or os.environ.get("QWEN3LAB_DEBUG", "") not in ("", "0"):
            raise
        message = " ".join(str(e).split("\n")) or type(e).__name__
        raise SystemExit(f"qwen3lab {args.command}: error: {message}") from None
