"""DenseNet-121 BMD regression (paper §3.3, DESIGN.md "Method" 6–7): trabecular patches → BMD per level.

The network is MONAI's ``DenseNet121(spatial_dims=2, in_channels=3, out_channels=1)`` (4 dense blocks, 3
transitions, 6,954,881 parameters). Its output is a normalised BMD, ``(bmd − BMD_CENTRE) / BMD_SCALE``, so
the regression head works near unit scale; :func:`predict_bmd` maps it back to mg/cm³ (K2HPO4-equivalent,
QCT). Categories (ACR/ISCD spine QCT): < 80 osteoporosis, 80–120 osteopenia (both ends inclusive), > 120
normal; the patient's value is the mean over the measured levels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from LumbarBMDLib._compat import zip_strict
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.patches import PATCH_SIZE, TrabecularPatch
from LumbarBMDLib.seg_training import resolve_device
from LumbarBMDLib.segmentation import models_dir
from LumbarBMDLib.weights import architecture_field, check_fits, load_model

BMD_CENTRE = 110.0  # mg/cm³: output normalisation (≈ the middle of the adult range)
BMD_SCALE = 50.0
OSTEOPOROSIS_BELOW = 80.0
NORMAL_ABOVE = 120.0
CATEGORIES = ("osteoporosis", "osteopenia", "normal")


def bmd_category(bmd_mg_cm3: float) -> str:
    """< 80 osteoporosis, 80–120 osteopenia (inclusive), > 120 normal (mg/cm³, spine QCT, ACR/ISCD)."""
    if not np.isfinite(bmd_mg_cm3):
        raise ValueError("BMD must be finite")
    if bmd_mg_cm3 < OSTEOPOROSIS_BELOW:
        return "osteoporosis"
    if bmd_mg_cm3 > NORMAL_ABOVE:
        return "normal"
    return "osteopenia"


def bmd_network(in_channels: int = 3) -> torch.nn.Module:
    """MONAI DenseNet-121 for 2-D patches ``(N, 3, 32, 32)`` → ``(N, 1)`` normalised BMD."""
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=1)


@dataclass
class RegressionModel:
    """A loaded DenseNet-121 with its model card."""

    network: torch.nn.Module
    card: dict
    sha256: str
    device: torch.device
    verified: bool = True  # False: the card had no sha256 and the caller accepted an unverified model

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "auto", *,
             allow_unverified: bool = False) -> RegressionModel:
        """Load ``path`` (default: the shipped ``regression.safetensors``) and its ``.json`` model card, checked
        (:func:`~LumbarBMDLib.weights.load_model`); ``allow_unverified`` accepts a card without sha256."""
        path = Path(path) if path else models_dir() / "regression.safetensors"
        weights = load_model(path, "regression", allow_unverified)
        in_channels = architecture_field(weights.card, path, "in_channels", int, "regression")
        if in_channels != 3:  # the patch is 3 axial slices (z − 1 mm, z, z + 1 mm)
            raise LumbarBMDError(f"model card {path.with_suffix('.json')}: a regression model takes 3 input "
                                 f"channels (the patch's three slices), this one {in_channels}")
        net = bmd_network(in_channels)  # fixed size once in_channels is 3: no need to probe on the meta device
        check_fits(net, weights.tensors, path, "regression")
        try:
            net.load_state_dict(weights.tensors)
        except RuntimeError as err:
            raise LumbarBMDError(f"regression weights {path} do not fit DenseNet-121: {err}") from None
        dev = resolve_device(device)
        return cls(net.to(dev).eval(), weights.card, weights.sha256, dev, weights.verified)


@dataclass
class LevelBMD:
    """BMD of one level.

    Attributes:
        level: "L1".."L4".
        found: whether a BMD was measured.
        reason: why not ("" when measured).
        bmd_mg_cm3: BMD (mg/cm³, QCT-equivalent); NaN when not measured.
        category: "osteoporosis" | "osteopenia" | "normal"; "" when not measured.
        centre_lps: LPS point (mm) of the patch centre; None when not measured.
    """

    level: str
    found: bool
    reason: str = ""
    bmd_mg_cm3: float = float("nan")
    category: str = ""
    centre_lps: np.ndarray | None = None


@torch.inference_mode()
def predict_normalised(network: torch.nn.Module, images: np.ndarray, device: torch.device) -> np.ndarray:
    """Network output for patches ``(N, 3, 32, 32)`` in [0, 1] → ``(N,)`` normalised BMD."""
    if images.ndim != 4 or images.shape[1:] != (3, PATCH_SIZE, PATCH_SIZE):
        raise ValueError(f"patches must be (N, 3, {PATCH_SIZE}, {PATCH_SIZE}), got {images.shape}")
    network.eval()
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device)
    y = network(x)[:, 0].float().cpu().numpy()
    if not np.isfinite(y).all():
        raise LumbarBMDError("the regression model gave non-finite output (NaN or infinity) for this case: its "
                             "weights are damaged or unsuited; no BMD was measured")
    return y


def predict_bmd(model: RegressionModel, patches: list[TrabecularPatch]) -> list[LevelBMD]:
    """BMD per level from its patch (one batch); levels without a patch keep their reason."""
    found = [p for p in patches if p.found]
    values = {}
    if found:
        y = predict_normalised(model.network, np.stack([p.image for p in found]), model.device)
        values = {p.level: float(v) * BMD_SCALE + BMD_CENTRE for p, v in zip_strict(found, y)}
    out = []
    for p in patches:
        if p.level in values:
            bmd = values[p.level]
            out.append(LevelBMD(p.level, True, "", bmd, bmd_category(bmd), p.centre_lps))
        else:
            out.append(LevelBMD(p.level, False, p.reason))
    return out


def patient_bmd(levels: list[LevelBMD]) -> tuple[float, str]:
    """The patient's BMD (mean over the measured levels) and its category; (NaN, "") when none was measured."""
    values = [lv.bmd_mg_cm3 for lv in levels if lv.found]
    if not values:
        return float("nan"), ""
    mean = float(np.mean(values))
    return mean, bmd_category(mean)
