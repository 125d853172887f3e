"""HF model folders in and out: config.json, generation_config.json, (sharded) safetensors with an index.

Because the model keeps HF parameter names, loading is a key-for-key copy. Tensors are read one at a time from the
memory-mapped files straight into their final dtype and device, and assigned into a model built on the meta device,
so a model never exists twice in RAM.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from .config import ModelConfig
from .model import Qwen3
from .runtime import default_device, resolve_dtype

log = logging.getLogger("qwen3lab")

INDEX = "model.safetensors.index.json"
IM_END, ENDOFTEXT = 151645, 151643


class CheckpointError(ValueError):
    """A model folder whose tensors do not fit its config."""


# ---- loading ----


def resolve_folder(path: str | os.PathLike) -> Path:
    """A local folder as is; a hub id ('org/name') downloaded first where huggingface_hub and the network allow."""
    folder = Path(path)
    if folder.is_dir():
        return folder
    if folder.exists():
        raise NotADirectoryError(f"{folder}: is a file; pass the model folder that holds config.json")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        raise FileNotFoundError(f"{path}: no such model folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
    except Exception as e:  # offline, no such repo, or huggingface_hub missing: all need the same fix
        raise FileNotFoundError(
            f"{path}: not a local folder, and downloading it from the hub failed ({type(e).__name__}: {e}); "
            "download the model elsewhere and pass its local folder"
        ) from e


def _weight_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    index = folder / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: folder / file for name, file in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise CheckpointError(f"{index}: names shard {f.name}, which is missing from {folder}")
        return files
    single = folder / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{folder}: no model.safetensors or {INDEX}; qwen3lab reads safetensors folders only")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def iter_tensors(folder: Path, model: Qwen3, dtype: torch.dtype, device: torch.device):
    """(name, tensor) for every tensor the model expects, one at a time (names and shapes checked first, against
    the model built from config.json), each cast to dtype on device as it is read."""
    expected = {name: p.shape for name, p in model.state_dict(keep_vars=True).items()}
    tied = model.config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight")
    files = _weight_files(folder)
    if tied:
        files.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway; the embedding is the source
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:5])}")
        raise CheckpointError(f"{folder}: weights do not match config.json — " + "; ".join(parts))
    for name, file in files.items():
        # the file opened per tensor: its mapping lives as long as that tensor, so a consumer that keeps only a
        # converted copy (the 4-bit loader) never has more of a multi-GB shard resident than one tensor
        with safe_open(file, framework="pt", device="cpu") as f:
            shape, want = tuple(f.get_slice(name).get_shape()), tuple(expected[name])
            if shape != want:
                raise CheckpointError(f"{file}: tensor {name} has shape {shape}, config.json implies {want}")
            tensor = f.get_tensor(name)
        yield name, tensor.to(device=device, dtype=dtype)


_PIECE_BYTES = 32 * 2**20  # what a rank reads (and maps) of a tensor at once while filling its shards


def _shard_rows(param) -> tuple[torch.Tensor, int]:
    """A parameter's local tensor and the first global row it holds. FSDP2 shards dim 0 as torch.chunk does: chunks
    of ceil(rows / ranks), the last ranks' shorter or empty."""
    if not isinstance(param, DTensor):
        return param.data, 0
    mesh = param.device_mesh
    n, world = param.shape[0], mesh.size()
    start = min(mesh.get_local_rank() * -(-n // world), n)
    local = param.to_local()
    if local.shape[0] != min(-(-n // world), n - start):
        raise CheckpointError(f"unexpected FSDP shard of {tuple(param.shape)}: {tuple(local.shape)} rows at {start}")
    return local, start


@torch.no_grad()
def load_sharded(
    module: torch.nn.Module, path: str | os.PathLike, initial: dict[str, torch.Tensor], prefix: str = ""
) -> None:
    """Fill a module that FSDP2 sharded while on the meta device (and `to_empty` gave storage) from an HF folder.

    Each rank reads only the rows of its own shards, a few MiB at a time (the file is opened per piece, so no more
    of it is mapped at once): no rank ever holds the full model, and its peak is its shards plus one piece.
    Parameters the checkpoint lacks take their rows of `initial`, their full starting values made before sharding
    (LoRA adapters, trained token rows). prefix: what the module's names add to HF's (WithLoss: "model.")."""
    folder = resolve_folder(path)
    files = _weight_files(folder)
    for name, param in module.named_parameters():
        key = name.replace("_checkpoint_wrapped_module.", "").removeprefix(prefix)
        local, start = _shard_rows(param)
        if key not in files:
            if name not in initial:
                raise CheckpointError(f"{folder}: no tensor {key} for the model's parameter {name}")
            local.copy_(initial[name][start : start + local.shape[0]])
            continue
        with safe_open(files[key], framework="pt", device="cpu") as f:
            shape = tuple(f.get_slice(key).get_shape())
        if shape != tuple(param.shape):
            raise CheckpointError(
                f"{files[key]}: tensor {key} has shape {shape}, the model expects {tuple(param.shape)}"
            )
        row_bytes = max(1, local[:1].numel() * 4)
        step = max(1, _PIECE_BYTES // row_bytes)
        for a in range(0, local.shape[0], step):
            b = min(a + step, local.shape[0])
            with safe_open(files[key], framework="pt", device="cpu") as f:
                local[a:b].copy_(f.get_slice(key)[start + a : start + b])
    for name, buffer in module.named_buffers():  # not sharded, and emptied by to_empty with the rest
        if name in initial:
            buffer.copy_(initial[name])


def load_model(
    path: str | os.PathLike, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None, take=None
) -> Qwen3:
    """Load an HF Qwen3 model folder (or hub id) into a qwen3lab `Qwen3`, in eval mode.

    take(model, name, tensor) -> bool, if given, sees each tensor as it is read and returns True where it installed
    the tensor itself (e.g. quantised it: train/quant.py); the others are assigned as read."""
    folder = resolve_folder(path)
    cfg = ModelConfig.from_file(folder)
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device, cfg.torch_dtype)
    with torch.device("meta"):
        model = Qwen3(cfg)
    state = {}
    for name, tensor in iter_tensors(folder, model, dtype, device):
        if take is None or not take(model, name, tensor):
            state[name] = tensor
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    gen = folder / "generation_config.json"
    model.generation_config = json.loads(gen.read_text()) if gen.is_file() else {}
    return model.eval()


def stored_dtype(path: str | os.PathLike) -> torch.dtype:
    """The dtype a folder's config.json says its weights are stored in (float32 if it names none torch knows)."""
    stored = getattr(torch, ModelConfig.from_file(resolve_folder(path)).torch_dtype, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


# ---- saving ----


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: use bytes or a size such as '5GB' or '200MB'")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def atomic_write(path: Path, write) -> None:
    """Write to a temporary name beside `path`, then rename: a crash never leaves a half-written file.

    The file gets the mode a plain open() gives (0644 under the usual umask): safetensors creates its files 0600,
    which another user or service (a vLLM server, a shared cluster folder) could not read.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def generation_config(cfg: ModelConfig) -> dict:
    """eos lists <|im_end|> as well as <|endoftext|>: a base model tuned on chat ends its turns with <|im_end|>,
    and a runtime that only knows the base eos never stops (LlamaFactory #7943)."""
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    eos = [e for e in eos if e is not None]
    for extra in (IM_END, ENDOFTEXT):
        if extra < cfg.vocab_size and extra not in eos:
            eos.append(extra)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos}
    if cfg.pad_token_id is not None:
        gen["pad_token_id"] = cfg.pad_token_id
    return gen


def save_model(model: Qwen3, path: str | os.PathLike, max_shard_size: int | str = "5GB", dtype=None) -> Path:
    """Write an HF folder: config.json, generation_config.json, safetensors shards (+ index when more than one).

    Files are written under temporary names and renamed into place; shards of an earlier save that the new one no
    longer uses are removed after the new index is in place.
    """
    cfg = model.config
    state = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    dtype = dtype or next(iter(state.values())).dtype
    return write_hf_folder(
        cfg, path, {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__, max_shard_size, dtype
    )


def write_hf_folder(
    cfg: ModelConfig,
    path,
    shapes: dict[str, tuple],
    get,
    max_shard_size: int | str = "5GB",
    dtype=torch.float32,
    write: bool = True,
) -> Path:
    """The HF folder of save_model from tensors asked for one at a time: get(name) is called once per name, shard
    by shard, and a shard is written as soon as it is complete, so at most one shard is held. write=False runs the
    same calls without writing (the other ranks of a sharded export, whose part is in each gathering)."""
    folder = Path(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    limit = _parse_size(max_shard_size)
    plan: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if plan[-1] and size + nbytes > limit:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    n = len(plan)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    if write:
        folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for file, shard in zip(names, plan, strict=True):
        tensors = {k: get(k).detach().to(device="cpu", dtype=dtype).contiguous() for k in shard}
        if write:
            atomic_write(folder / file, lambda p, t=tensors: save_file(t, p, metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(shard, file))
        del tensors
    if not write:
        return folder
    total = sum(math.prod(shape) * dtype.itemsize for shape in shapes.values())
    index = folder / INDEX
    if n > 1:
        body = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        atomic_write(index, lambda p: p.write_text(body + "\n"))
    else:
        index.unlink(missing_ok=True)
    for stale in folder.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    hf = cfg.to_hf_dict() | {"torch_dtype": str(dtype).removeprefix("torch.")}
    atomic_write(folder / "config.json", lambda p: p.write_text(json.dumps(hf, indent=2) + "\n"))
    gen = json.dumps(generation_config(cfg), indent=2)
    atomic_write(folder / "generation_config.json", lambda p: p.write_text(gen + "\n"))
    return folder


def new_model(cfg: ModelConfig, device: str | torch.device = "cpu", dtype=torch.float32, seed: int = 0) -> Qwen3:
    """A randomly initialised model, built on meta and materialised once."""
    with torch.device("meta"):
        model = Qwen3(cfg).to(dtype)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed)
    return model
