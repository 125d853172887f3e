"""Training checkpoints: what a run saves and resumes from (torch.distributed.checkpoint folders, no pickle).

A checkpoint holds the trainable weights, the optimizer and schedule, the RNG and the data position; it is written
to a temporary folder and renamed into place, so a failed save leaves the last good one intact.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from ..model.hf import CheckpointError
from .parallel import Dist

log = logging.getLogger("qwen3lab")


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
