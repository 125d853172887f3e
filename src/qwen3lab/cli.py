"""The `qwen3lab` command. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import sys
import time


def cmd_info(args) -> None:
    """Print a model's config and parameter counts (a folder or a preset name)."""
    from .config import PRESETS, ModelConfig, preset

    cfg = preset(args.model) if args.model in PRESETS else ModelConfig.from_file(args.model)
    for key, value in cfg.to_hf_dict().items():
        print(f"{key:28} {value}")
    print(f"{'parameters':28} {cfg.num_parameters():,} ({cfg.num_parameters(embedding=False):,} outside the embedding)")


def cmd_smoke(args) -> None:
    """Build a small random Qwen3, run a forward pass, save it as an HF folder and load it back."""
    import torch

    from .checkpoint import load_model, new_model, save_model
    from .config import preset

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
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)
