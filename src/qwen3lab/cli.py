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


def cmd_train(args, extra: list[str]) -> None:
    """Supervised fine-tuning from a YAML config, with any key overridden as --section.key value."""
    from .config import ConfigError, config_keys, load_train_config
    from .train import train

    overrides = {k: getattr(args, k) for k in config_keys() if getattr(args, k, None) is not None}
    for flag in extra:  # anything argparse did not know: let the config say what is near
        if flag.startswith("--"):
            raise ConfigError(f"{flag}: " + _near_key_message(flag[2:].split("=")[0]))
    cfg = load_train_config(args.config, overrides)
    run = train(cfg)
    print(f"run folder: {run}")


def _near_key_message(key: str) -> str:
    from .config import ConfigError, TrainConfig, set_key

    try:
        set_key(TrainConfig(), key, None)
    except ConfigError as e:
        return str(e)
    return "not a config key"


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One --flag per config key (dotted for sections), so YAML keys and flags never drift apart."""
    from .config import config_keys

    for key, kind in config_keys().items():
        p.add_argument(f"--{key}", dest=key, default=None, metavar=kind.__name__.upper())


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
    return parser


def main(argv: list[str] | None = None) -> None:
    from .chat import ChatError
    from .config import ConfigError
    from .data import DataError

    args, extra = build_parser().parse_known_args(argv)
    try:
        if getattr(args, "takes_extra", False):
            args.func(args, extra)
        elif extra:
            raise SystemExit(f"qwen3lab {args.command}: unrecognized arguments: {' '.join(extra)}")
        else:
            args.func(args)
    except (ConfigError, DataError, ChatError, FileNotFoundError) as e:
        # Bad input: one line that names the file / key / example and the fix, not a traceback.
        raise SystemExit(f"qwen3lab {args.command}: error: {e}") from None
