"""Model weights as safetensors with a JSON model card; no pickles anywhere.

A model is two files: ``NAME.safetensors`` (tensors, plus string metadata) and ``NAME.json`` (the model card:
architecture, sha256 of the weights file, training data, epochs, measured metrics). Training checkpoints
also store the optimizer's tensors and the random-number states so a run can resume exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from LumbarBMDLib.errors import LumbarBMDError


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> Path:
    """Write tensors (contiguous CPU copies) to a safetensors file atomically; metadata values become JSON strings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a safetensors file: (tensors on CPU, metadata decoded from JSON)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LumbarBMDError(f"model file not found: {path}")
    try:
        tensors = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except Exception as err:  # safetensors raises several types for a damaged file
        raise LumbarBMDError(f"could not read model weights {path}: {err}") from None
    return tensors, meta


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state_dict into tensors (``opt.<param>.<name>``) and JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore an optimizer from :func:`optimizer_to_tensors` output (in place)."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rng,
                    meta: dict) -> Path:
    """A training checkpoint: model (``model.*``), optimizer (``opt.*``) and both RNG states, plus ``meta``."""
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    return save_tensors(tensors, path, {**meta, "optimizer": opt_meta, "rng.numpy": rng.bit_generator.state})


def resume_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rng) -> dict:
    """Restore what :func:`save_checkpoint` wrote (in place); returns its metadata."""
    path = Path(path)
    if not path.is_file():
        raise LumbarBMDError(f"--resume: no checkpoint to resume from in {path.parent}")
    tensors, meta = load_tensors(path)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer_from_tensors(optimizer, tensors, meta["optimizer"])
    torch.set_rng_state(tensors["rng.torch"])
    rng.bit_generator.state = meta["rng.numpy"]
    return meta


def load_model_card(path: str | Path, what: str) -> tuple[dict, str]:
    """The model card (``path`` with .json) of a weights file and the file's sha256, checked against each other."""
    path = Path(path)
    card_path = path.with_suffix(".json")
    if not path.is_file() or not card_path.is_file():
        raise LumbarBMDError(f"{what} model not found: {path} (and its model card {card_path.name})")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    digest = sha256_of(path)
    if card.get("sha256") and card["sha256"] != digest:
        raise LumbarBMDError(f"{what} model {path} does not match its model card (sha256 differs)")
    return card, digest
