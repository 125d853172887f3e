"""HF model folders in and out: config.json, generation_config.json, (sharded) safetensors with an index; and the
training checkpoints a run saves and resumes from (torch.distributed.checkpoint folders).

Because the model keeps HF parameter names, loading is a key-for-key copy. Tensors are read one at a time from the
memory-mapped files straight into their final dtype and device, and assigned into a model built on the meta device,
so a model never exists twice in RAM.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from .config import ModelConfig
from .model import Qwen3
from .parallel import Dist

log = logging.getLogger("qwen3lab")

INDEX = "model.safetensors.index.json"
IM_END, ENDOFTEXT = 151645, 151643


class CheckpointError(ValueError):
    """A model folder whose tensors do not fit its config."""


# ---- dtype policy ----


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Elsewhere bf16 matmul is emulated and
    hundreds of times slower than fp32, a trap users fall into when a checkpoint says bfloat16."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """Whether this CPU multiplies bf16 at least as fast as fp32, measured once per process (~50 ms).

    The flags alone do not tell: with AMX bf16 ran ~4x faster than fp32 here, with AVX512-BF16 but no AMX it ran
    at 167 GFLOP/s against fp32's 249, and without either it is emulated (~400x slower), so it is not even tried.
    """
    if not cpu_has_native_bf16():
        return False

    def seconds(dtype):
        a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
        a @ b  # warm-up: oneDNN builds its kernel on the first call
        t0 = time.perf_counter()
        for _ in range(8):
            a @ b
        return time.perf_counter() - t0

    fp32, bf16 = min(seconds(torch.float32) for _ in range(3)), min(seconds(torch.bfloat16) for _ in range(3))
    log.info("CPU matmul 512^3: bf16 %.2f ms, fp32 %.2f ms", bf16 / 8e-3, fp32 / 8e-3)
    return bf16 <= fp32


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, checkpoint_dtype: str) -> torch.dtype:
    """'auto' -> the checkpoint's dtype where the device computes it natively, else float32 (and say why)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; use 'auto', 'float32' or 'bfloat16'")
        return resolved
    wanted = getattr(torch, checkpoint_dtype, torch.float32)
    if wanted == torch.float32:
        return wanted
    if device.type == "cuda" and wanted == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log.info("dtype auto: this GPU has no bf16; computing in float16")
        return torch.float16
    if device.type == "cpu" and not cpu_bf16_is_fast():
        log.info(
            "dtype auto: computing in float32 — the checkpoint is %s but this CPU multiplies bf16 slower than fp32 "
            "(measured; without AVX512-BF16/AMX bf16 is emulated, hundreds of times slower)",
            checkpoint_dtype,
        )
        return torch.float32
    log.info("dtype auto: %s, the checkpoint's dtype, computed natively on %s", checkpoint_dtype, device.type)
    return wanted


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def load_state_dict(folder: Path, model: Qwen3, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Read every tensor the model expects, checking names and shapes against it, cast on the way in."""
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
    state = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in names:
                t = f.get_slice(name)
                if tuple(t.get_shape()) != tuple(expected[name]):
                    raise CheckpointError(
                        f"{file}: tensor {name} has shape {tuple(t.get_shape())}, config.json implies "
                        f"{tuple(expected[name])}"
                    )
                state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    return state


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
    path: str | os.PathLike, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None
) -> Qwen3:
    """Load an HF Qwen3 model folder (or hub id) into a qwen3lab `Qwen3`, in eval mode."""
    folder = resolve_folder(path)
    cfg = ModelConfig.from_file(folder)
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device, cfg.torch_dtype)
    with torch.device("meta"):
        model = Qwen3(cfg)
    state = load_state_dict(folder, model, dtype, device)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    gen = folder / "generation_config.json"
    model.generation_config = json.loads(gen.read_text()) if gen.is_file() else {}
    return model.eval()


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


# ---- training checkpoints: save and resume ----


def list_checkpoints(root: Path) -> list[Path]:
    """The finished checkpoints in a folder of them (the run's `checkpoints/`, or `checkpoint_dir`), oldest first."""
    return sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


_STATE_OPTIONS = StateDictOptions(ignore_frozen_params=True)  # LoRA checkpoints hold the adapters, not the base


@contextlib.contextmanager
def _one_process_is_meant():
    """DCP warns on every save and load without a process group that it assumes one process: here that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_checkpoint(
    root: Path,
    step: int,
    net,
    optimizer,
    scheduler,
    keep: int,
    d: Dist,
    data: dict | None = None,
    run: dict | None = None,
):
    """torch.distributed.checkpoint: each rank writes its own shards of the trained weights and Adam state, plus its
    scheduler / RNG / data position (`data`: the cursor's rows taken, global) and what the run was (`run`: its
    objective and total steps), into root/step-N.

    Written into a temporary folder renamed once every rank is done, so an interrupted save leaves the last good
    checkpoint as it was. root may be shared by all nodes or local to each (node-local disks): each rank writes its
    own files where it is, rank 0 the metadata, which then goes to every node's folder too; on each node that does
    not see rank 0's folder, its first process makes, renames and prunes the node's folder."""
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / ".rank0").touch()
    d.barrier()
    shared = (tmp / ".rank0").is_file()  # this rank sees rank 0's folder
    node_main = not shared and d.local_rank == 0  # the first process of a node with a folder of its own
    if node_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    model_sd, optim_sd = get_state_dict(net, optimizer, options=_STATE_OPTIONS)
    sharded, replicated = _split({"model": model_sd, "optimizer": optim_sd}, d.world > 1)
    with _one_process_is_meant():
        dcp.save(sharded, checkpoint_id=tmp, no_dist=d.world == 1)
    state = {
        "format": 3,
        "step": step,
        "world": d.world,
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "data": data,
        "replicated": replicated,
        "run": run or {},
    }
    torch.save(state, tmp / f"state-rank{d.rank}.pt")  # tensors and plain data only: loads with weights_only
    metadata = [(tmp / ".metadata").read_bytes() if d.main else None]
    if d.world > 1:
        torch.distributed.broadcast_object_list(metadata, src=0)
    if node_main:
        (tmp / ".metadata").write_bytes(metadata[0])
    d.barrier()
    if d.main or node_main:
        (tmp / ".rank0").unlink(missing_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    d.barrier()
    return final


def _split(tree: dict, by_rank: bool) -> tuple[dict, dict]:
    """(what DCP saves, what every rank keeps in its own state file). Under FSDP the sharded tensors go to DCP and
    the replicated rest (Adam's step counts, param_groups) stays with each rank: DCP would write one copy of it, in
    one rank's file, which another node's local folder would lack."""
    if not by_rank:
        return tree, {}
    sharded, replicated = {}, {}
    for key, value in tree.items():
        if isinstance(value, dict):
            s, r = _split(value, True)
            if s:
                sharded[key] = s
            if r:
                replicated[key] = r
        elif isinstance(value, DTensor):
            sharded[key] = value
        else:
            replicated[key] = value
    return sharded, replicated


def _without(tree: dict, drop: dict) -> dict:
    """tree less the leaves that drop has (what the checkpoint keeps outside DCP); a dict left empty goes too."""
    out = {}
    for key, value in tree.items():
        if key not in drop:
            out[key] = value
        elif isinstance(value, dict) and isinstance(drop[key], dict):
            rest = _without(value, drop[key])
            if rest:
                out[key] = rest
    return out


def _merge(tree: dict, extra: dict) -> None:
    """Put extra's leaves into tree, in place."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge(tree[key], value)
        else:
            tree[key] = value


def rng_state() -> dict:
    """Every RNG's state as tensors and plain data, so resuming reads it with torch.load(weights_only=True)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(rng: dict) -> None:
    version, mt, gauss = rng["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a plain pickle: read it allowing only what DCP writes there (its metadata classes, torch
    sizes, dtypes and layouts, paths), so a checkpoint folder from elsewhere cannot run code when it is resumed."""

    ALLOWED = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
    }

    def find_class(self, module, name):
        if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"):
            obj = getattr(importlib.import_module(module), name, None)
            ok = isinstance(obj, type) and obj.__module__ == module
        else:
            ok = (module, name) in self.ALLOWED or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
            )
        if not ok:
            raise pickle.UnpicklingError(f"{module}.{name} is not something a checkpoint's metadata holds")
        return super().find_class(module, name)


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP unpickles non-tensor entries (the optimizer's hyperparameters) with weights_only=False; accept them only
    when they are tensors and plain data."""

    def load_bytes(self, read_item, value):
        torch.load(value, weights_only=True)  # raises on anything else
        value.seek(0)
        super().load_bytes(read_item, value)


def check_checkpoint(path: Path, d: Dist) -> int:
    """Every file of the checkpoint this rank needs must be there, whole: a missing shard is an error on every rank
    (each checks the same shared folder), never one rank failing while the others wait for it. In a node-local
    folder (it holds only its node's ranks' files) each rank checks its own files, and the number of ranks must be
    the saved one. Returns the number of ranks that saved it."""
    hint = "delete this folder to resume from the one before, or set resume: false"
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path}: checkpoint has no .metadata (an unfinished save?); {hint}")
    mine = path / f"state-rank{d.rank}.pt"
    found = mine if mine.is_file() else path / "state-rank0.pt"
    if not found.is_file():
        raise FileNotFoundError(f"{path}: checkpoint is missing state-rank{d.rank}.pt; {hint}")
    saved = _read_state(found)["world"]
    local = not all((path / f"state-rank{r}.pt").is_file() for r in range(saved))
    if local and saved != d.world:
        raise ValueError(
            f"{path}: a node-local checkpoint of {saved} ranks resumes on {saved} ranks only; to resume "
            f"on {d.world}, copy every node's step folder into one shared folder first"
        )
    try:
        with open(path / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}/.metadata: refused, it is not a plain checkpoint index ({e}); {hint}") from None
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        if local and not name.startswith(f"__{d.rank}_"):
            continue  # another node's file
        f = path / name
        if not f.is_file():
            raise FileNotFoundError(f"{path}: checkpoint shard {name} is missing; {hint}")
        if f.stat().st_size < size:
            raise ValueError(f"{f}: checkpoint shard is truncated ({f.stat().st_size} of {size} bytes); {hint}")
    return saved


def _read_state(state_file: Path) -> dict:
    try:
        return torch.load(state_file, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{state_file}: refused: it holds pickled Python objects, not only tensors and plain data (a file from an "
            "older qwen3lab, or tampered with); resume from a checkpoint written by this version, or set resume: false"
        ) from None


def load_checkpoint(path: Path, net, optimizer, scheduler, d: Dist, objective: str | None = None) -> tuple[int, dict]:
    """Weights, optimizer, scheduler and RNG from a checkpoint; returns (step, the saved state: world, data, ...).

    Saved by another number of ranks, DCP reshards the weights and the Adam state to this one; a rank the saved run
    did not have takes rank 0's RNG state. A checkpoint of another objective's run is refused."""
    saved = check_checkpoint(path, d)
    state = _read_state(path / f"state-rank{d.rank if d.rank < saved else 0}.pt")
    was = (state.get("run") or {}).get("objective")
    if objective is not None and was not in (None, objective):
        raise CheckpointError(
            f"{path}: a checkpoint of a {was} run, and this run's objective is {objective}; use "
            "another out folder, or resume: false to start anew"
        )
    model_sd, optim_sd = get_state_dict(net, optimizer, options=_STATE_OPTIONS)
    sd = {"model": model_sd, "optimizer": optim_sd}
    replicated = state.get("replicated") or {}
    try:
        with _one_process_is_meant():
            dcp.load(
                _without(sd, replicated), checkpoint_id=path, no_dist=d.world == 1, planner=_WeightsOnlyLoadPlanner()
            )
        _merge(sd, replicated)
        # dcp.load has filled every key get_state_dict asked for (or raised); strict=False only lets the frozen base
        # weights, which LoRA checkpoints leave out, stay as they are
        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        set_state_dict(net, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"], options=options)
    except (RuntimeError, ValueError, KeyError, dcp.api.CheckpointException) as e:  # DCP's: not an Exception
        if isinstance(e, dcp.api.CheckpointException):  # the first rank's own exception
            e = next(iter(e.failures.values()))[0]
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{path}: does not fit this run ({first[:300]}); it was written by a run with another "
            "model, LoRA or trained-token setting: use another out folder, or resume: false to "
            "start anew"
        ) from e
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"], state
