"""Model weights as safetensors with a JSON model card; no pickles anywhere.

A model is two files: ``NAME.safetensors`` (tensors, plus string metadata) and ``NAME.json`` (the model card:
architecture, sha256 of the weights file, training data, epochs, measured metrics). Training checkpoints
also store the optimizer's tensors and the random-number states so a run can resume exactly.

Nothing is taken on trust when a model is loaded (:func:`load_model`): the card must be a JSON object, the
weights must be a readable safetensors file (a pickle renamed ``.safetensors`` is refused, never unpickled),
every floating-point tensor must be finite, and the sha256 of the weights must equal the card's ``sha256``.
A card **without** a sha256 is refused too, unless the caller explicitly accepts an unverified model:
``allow_unverified=True`` (the command line's ``--allow-unverified-model``) or the environment variable
``LUMBARBMD_ALLOW_UNVERIFIED_MODELS=1``. Such a model is loaded with ``verified = False``, which the results
record, so a measurement made with it can always be told apart.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from LumbarBMDLib.errors import LumbarBMDError

#: Environment variable that, set to exactly "1", accepts models whose card has no sha256 (see the module docstring).
ALLOW_UNVERIFIED_ENV = "LUMBARBMD_ALLOW_UNVERIFIED_MODELS"


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json_object(path: str | Path, what: str) -> dict:
    """The JSON object in ``path``; a file that is unreadable, not JSON or not an object is a sentence naming it.

    ``what`` names the file for the user (e.g. "model card", "reference file").
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LumbarBMDError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LumbarBMDError(f"{what} {path} cannot be read ({err}): replace it with an intact copy") from None
    except json.JSONDecodeError as err:
        raise LumbarBMDError(f"{what} {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}): "
                             "replace it with an intact copy") from None
    if not isinstance(value, dict):
        raise LumbarBMDError(f"{what} {path} must hold a JSON object ({{...}}), not a {type(value).__name__}")
    return value


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> Path:
    """Write tensors (contiguous CPU copies) to a safetensors file atomically; metadata values become JSON strings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def _decode(value: str):
    """A metadata value: JSON as this library writes it; a plain string (other tools' metadata) as it is."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a safetensors file: (tensors on CPU, metadata decoded from JSON).

    safetensors parses only its own format (a JSON header and raw little-endian data), so a pickle or any other
    file renamed ``.safetensors`` is refused here and never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise LumbarBMDError(f"model file not found: {path}")
    try:
        tensors = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            meta = {k: _decode(v) for k, v in (f.metadata() or {}).items()}
    except (SafetensorError, OSError) as err:
        raise LumbarBMDError(f"model weights {path} are not a readable safetensors file ({err}): the file is "
                             "damaged, truncated or of another format; replace it with an intact copy") from None
    return tensors, meta


def check_finite(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse weights in which a floating-point tensor holds NaN or infinity (naming the first such tensor)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise LumbarBMDError(f"model weights {path} are damaged: tensor {name} holds {bad} NaN or infinite "
                                 "value(s); replace the file with an intact copy")


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


def unverified_allowed(allow_unverified: bool = False) -> bool:
    """Whether a model without a sha256 in its card may be loaded: the caller said so, or ``$ALLOW_UNVERIFIED_ENV``
    is exactly "1"."""
    return bool(allow_unverified) or os.environ.get(ALLOW_UNVERIFIED_ENV, "") == "1"


def load_model_card(path: str | Path, what: str, allow_unverified: bool = False) -> tuple[dict, str, bool]:
    """The model card (``path`` with .json) of a weights file, the file's sha256 and whether the two were checked
    against each other (``verified``; False only for a card without sha256 that the caller accepted)."""
    path = Path(path)
    card_path = path.with_suffix(".json")
    if not path.is_file() or not card_path.is_file():
        raise LumbarBMDError(f"{what} model not found: {path} (and its model card {card_path.name})")
    card = read_json_object(card_path, f"{what} model card")
    digest = sha256_of(path)
    expected = card.get("sha256")
    if expected is not None and not isinstance(expected, str):
        raise LumbarBMDError(f"model card {card_path}: sha256 must be the 64 hexadecimal digits of the weights file")
    if not expected:
        if not unverified_allowed(allow_unverified):
            raise LumbarBMDError(
                f"model card {card_path} has no sha256, so the {what} weights {path.name} cannot be verified: add "
                f"the file's sha256 ({digest}) to the card if you trust it, or accept an unverified model "
                f"explicitly (--allow-unverified-model, or {ALLOW_UNVERIFIED_ENV}=1)"
            )
        return card, digest, False
    if expected.lower() != digest:
        raise LumbarBMDError(f"{what} model {path} does not match its model card (sha256 differs)")
    return card, digest, True


@dataclass
class LoadedWeights:
    """What :func:`load_model` read and checked: the card, the tensors, the weights' sha256 and ``verified``."""

    card: dict
    tensors: dict[str, torch.Tensor]
    sha256: str
    verified: bool


def load_model(path: str | Path, what: str, allow_unverified: bool = False) -> LoadedWeights:
    """Card and weights of a model, checked: card a JSON object, sha256 matching (or explicitly waived, see
    :func:`load_model_card`), a readable safetensors file, all floating-point tensors finite."""
    card, digest, verified = load_model_card(path, what, allow_unverified)
    tensors, _ = load_tensors(path)
    check_finite(tensors, path)
    return LoadedWeights(card, tensors, digest, verified)


def architecture_field(card: dict, path: str | Path, key: str, kind: type, what: str):
    """``card["architecture"][key]`` checked to be a ``kind`` (int: a positive integer; list: of positive
    integers); anything else is a sentence naming the card."""
    card_path = Path(path).with_suffix(".json")
    arch = card.get("architecture")
    if not isinstance(arch, dict):
        raise LumbarBMDError(f"model card {card_path} has no architecture object: it is not a {what} model card")
    value = arch.get(key)

    def positive_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    ok = positive_int(value) if kind is int else isinstance(value, list) and all(positive_int(v) for v in value)
    if not ok:
        need = "a positive integer" if kind is int else "a list of positive integers"
        raise LumbarBMDError(f"model card {card_path}: architecture.{key} must be {need}, got {value!r}")
    return value


def check_fits(meta_module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    """Refuse weights whose tensor names or shapes differ from ``meta_module``'s state (the network the card
    describes; build it on the ``meta`` device when the card sets its size, so that an absurd card allocates
    nothing), naming the first difference."""
    expected = {k: tuple(v.shape) for k, v in meta_module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected == got:
        return
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    shapes = [k for k in sorted(set(expected) & set(got)) if expected[k] != got[k]]
    if shapes:
        detail = f"tensor {shapes[0]} is {list(got[shapes[0]])}, the card's network needs {list(expected[shapes[0]])}"
    elif missing:
        detail = f"{len(missing)} tensor(s) missing, e.g. {missing[0]}"
    else:
        detail = f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}"
    raise LumbarBMDError(f"{what} weights {path} do not fit the architecture in its model card ({detail})")
