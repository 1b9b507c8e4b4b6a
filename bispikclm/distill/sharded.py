"""Checkpoints of sharded (``train.fsdp``) runs, written by every process at once: each process saves the shards it
holds of the weights and of the AdamW moments with ``torch.distributed.checkpoint`` (DCP), in safetensors files
(``HuggingFaceStorageWriter``, one file per process under ``shards/``, each shard's offsets as JSON in the file's
header), so that no process gathers the whole state and nothing is pickled (DCP's default format pickles its
metadata). What is not sharded (AdamW's step counts and parameter groups) goes to the main process's
``state.safetensors`` beside them (:func:`bispikclm.runfolder.save_state`).

Loading reads, on each process, the slices of the files that its shards cover (DCP reshards: a run may resume
on another number of processes). ``benchmarks/fsdp_checkpoint.py`` measured this format against gathering the
full state on the main process (results/fsdp_checkpoint.json, docs/distill.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import runfolder

SHARDS = "shards"
SHARDING_INFO = "DCP_SHARDING_INFO"     # the header entry where HuggingFaceStorageWriter puts the offsets


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def sharded_state(model, optimizer, tied: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """``(sharded, rest)``: the sharded tensors of the model's weights (``model.<name>``, tied weights once) and of
    the optimizer's state (``optimizer.<name>.<key>``), each this process's DTensor shard; ``rest``, the optimizer's
    state without them (step counts and parameter groups, the same on every process)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dtensor = _dtensor()
    sharded = {f"model.{k}": v for k, v in get_model_state_dict(model).items() if k not in tied}
    state = get_optimizer_state_dict(model, optimizer)
    rest = {"state": {}, "param_groups": state["param_groups"]}
    for name, entries in state["state"].items():
        rest["state"][name] = {}
        for key, value in entries.items():
            if isinstance(value, dtensor):
                sharded[f"optimizer.{name}.{key}"] = value
            else:
                rest["state"][name][key] = value
    return sharded, rest


def _failure(err: BaseException) -> str:
    """The first line of why a DCP save or load failed (on some process), the operating system's words if a write
    failed."""
    failures = getattr(err, "failures", None) or {}
    causes = [pair[0] if isinstance(pair, tuple) else pair for pair in failures.values()] or [err]
    for cause in causes:
        reason = runfolder.os_reason(cause)
        if reason:
            return reason
    text = str(causes[0]).strip()
    return text.splitlines()[0] if text else type(causes[0]).__name__


def save(model, optimizer, folder: Path, tied: dict[str, str], what: str, after: str = "") -> dict:
    """Every process calls it: write this process's shards into ``folder`` (``<folder>/shards/``, which the main
    process has created); returns the optimizer state that is not sharded, for the main process to save. A failed
    write on any process is :class:`bispikclm.runfolder.WriteFailed` on every process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    sharded, rest = sharded_state(model, optimizer, tied)
    try:
        dcp.save(sharded, storage_writer=HuggingFaceStorageWriter(str(folder / SHARDS), save_distributed=True))
    except (Exception, dcp.api.CheckpointException) as err:
        raise runfolder.WriteFailed(f"cannot write {what}: {_failure(err)}{after}") from None
    return rest


def load(model, optimizer, folder: Path, rest: dict, tied: dict[str, str]) -> None:
    """Every process calls it: restore the weights and optimizer state :func:`save` wrote to ``folder`` (``rest``:
    the optimizer state it returned) into ``model``'s shards, each process reading the slices it holds. Every
    saved tensor must be there in its shape (``ValueError`` otherwise)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    weights = get_model_state_dict(model)
    state = get_optimizer_state_dict(model, optimizer)    # a fresh optimizer: AdamW's state made with zeros
    sharded = {f"model.{k}": v for k, v in weights.items() if k not in tied}
    dtensor = _dtensor()
    for name, entries in state["state"].items():
        sharded.update({f"optimizer.{name}.{key}": v for key, v in entries.items() if isinstance(v, dtensor)})
    if sorted(rest["state"]) != sorted(state["state"]):
        raise ValueError("its optimizer state names other parameters than the model has")
    try:
        dcp.load(sharded, storage_reader=HuggingFaceStorageReader(str(folder / SHARDS)))
    except (Exception, dcp.api.CheckpointException) as err:
        raise ValueError(_failure(err)) from None
    for name, source in tied.items():     # the tied weight shares the loaded one's storage; say so explicitly
        weights[name] = weights[source]
    set_model_state_dict(model, weights, options=StateDictOptions(strict=True))
    for name, entries in state["state"].items():     # the moments were loaded in place; the step counts here
        entries.update(rest["state"][name])
    state["param_groups"] = rest["param_groups"]
    set_optimizer_state_dict(model, optimizer, state)


def check(folder: Path) -> str | None:
    """Why the shards of checkpoint ``folder`` cannot be read, or ``None`` (each must open as safetensors and say
    where its tensors lie in the full ones). The manifest, checked first, catches torn and changed files."""
    from safetensors import safe_open

    files = sorted((folder / SHARDS).glob("*.safetensors"))
    if not files:
        return f"{SHARDS}/ holds no shard"
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                if SHARDING_INFO not in (f.metadata() or {}):
                    return f"{SHARDS}/{path.name} does not say where its shards lie"
        except Exception:
            return f"{SHARDS}/{path.name} is not a safetensors file"
    return None
