"""Checkpoints: safetensors weights with their JSON description embedded in the file's metadata.

Nothing is ever unpickled. A checkpoint names its kind ("vae", ...), the model config, and whatever
the trainer adds (step, data, wall time). Loading checks kind, config and every tensor name/shape,
and reports the first mismatch with the file's name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

FORMAT = "visaudio-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, of another kind or for another model shape."""


def save_checkpoint(path: Path | str, tensors: dict[str, torch.Tensor], kind: str, info: dict) -> Path:
    """Write tensors + {"format", "kind", **info} atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"visaudio": json.dumps({"format": FORMAT, "kind": kind, **info}, sort_keys=True)}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path | str, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, info) of a checkpoint of the given kind."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("visaudio")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if raw is None:
        raise CheckpointError(f"{path}: no ViSAudio metadata (not one of our checkpoints)")
    try:
        info = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({exc})") from exc
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {info.get('format')!r}, expected {FORMAT!r}")
    if info.get("kind") != kind:
        raise CheckpointError(f"{path}: a {info.get('kind')!r} checkpoint, expected {kind!r}")
    return tensors, info


def load_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path | str) -> None:
    """Copy tensors into a module; every name and shape must match."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, value in tensors.items():
        if value.shape != own[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(own[name].shape)}")
    module.load_state_dict(tensors)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer's state into tensors + JSON (for save_checkpoint)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for name, value in info["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
