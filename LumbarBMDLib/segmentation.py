"""L1–L4 segmentation of the sagittal candidates with the R2U-Net (inference).

The 10 candidate slices go through the network in one batch; their softmax probabilities are fused (mean)
and post-processed (:mod:`LumbarBMDLib.segmentation_post`: one component per level, cranio-caudal order,
missing levels flagged, per-level confidence). The label image lies on the candidates' central plane, whose
exact pixel → LPS mapping puts every level on the CT.

Speed: the network is fully convolutional, so it runs on a 512 × 256 window of the candidates (409.6 mm
superior–inferior × 204.8 mm anterior–posterior) centred 15 mm in front of the detected canal, where the
vertebral bodies and posterior elements are; outside the window the fused map is background. The window
halves the CPU time with no loss of anatomy (the vertebral bodies lie 5–50 mm in front of the canal).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.r2unet import R2UNet
from LumbarBMDLib.sagittal import SAGITTAL_PIXEL_MM, SagittalImages
from LumbarBMDLib.seg_training import resolve_device
from LumbarBMDLib.segmentation_post import SegmentationResult, fuse_probabilities, postprocess
from LumbarBMDLib.weights import load_tensors, sha256_of

WINDOW_COLUMNS = 256
WINDOW_ANTERIOR_MM = 15.0


def models_dir() -> Path:
    """Folder of the default models: ``$LUMBARBMD_MODELS`` or ``Resources/Models`` beside the package (source tree
    and Slicer module layout alike)."""
    env = os.environ.get("LUMBARBMD_MODELS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "Resources" / "Models"


@dataclass
class SegmentationModel:
    """A loaded R2U-Net with its model card."""

    network: R2UNet
    card: dict
    sha256: str
    device: torch.device

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "auto") -> SegmentationModel:
        """Load ``path`` (default: the shipped ``segmentation.safetensors``) and its ``.json`` model card."""
        path = Path(path) if path else models_dir() / "segmentation.safetensors"
        card_path = path.with_suffix(".json")
        if not path.is_file() or not card_path.is_file():
            raise LumbarBMDError(f"segmentation model not found: {path} (and its model card {card_path.name})")
        card = json.loads(card_path.read_text(encoding="utf-8"))
        digest = sha256_of(path)
        if card.get("sha256") and card["sha256"] != digest:
            raise LumbarBMDError(f"segmentation model {path} does not match its model card (sha256 differs)")
        arch = card["architecture"]
        net = R2UNet(arch["in_channels"], arch["out_channels"], tuple(arch["features"]), arch["t"])
        tensors, _ = load_tensors(path)
        try:
            net.load_state_dict(tensors)
        except RuntimeError as err:
            raise LumbarBMDError(
                f"segmentation weights {path} do not fit the architecture in its model card: {err}"
            ) from None
        dev = resolve_device(device)
        return cls(net.to(dev).eval(), card, digest, dev)


def window_columns(images: SagittalImages, canal_mean_lps: np.ndarray | None) -> tuple[int, int]:
    """The column range (anterior → posterior) the network runs on."""
    size = images.candidates_hu.shape[-1]
    if canal_mean_lps is None or WINDOW_COLUMNS >= size:
        return 0, size
    col = images.candidate_geometry.lps_to_pixel(np.asarray(canal_mean_lps, dtype=float))[0]
    centre = col - WINDOW_ANTERIOR_MM / SAGITTAL_PIXEL_MM
    c0 = int(np.clip(round(float(centre) - WINDOW_COLUMNS / 2), 0, size - WINDOW_COLUMNS))
    return c0, c0 + WINDOW_COLUMNS


@torch.inference_mode()
def candidate_probabilities(model: SegmentationModel, images: SagittalImages,
                            canal_mean_lps: np.ndarray | None = None) -> np.ndarray:
    """Softmax probabilities of the 10 candidates, float32 ``(10, 5, 512, 512)`` (background outside the window)."""
    x = images.network_input()
    c0, c1 = window_columns(images, canal_mean_lps)
    logits = model.network(torch.from_numpy(np.ascontiguousarray(x[..., c0:c1])).to(model.device))
    probs = torch.softmax(logits, dim=1).cpu().numpy()
    full = np.zeros((x.shape[0], probs.shape[1], *x.shape[2:]), np.float32)
    full[:, 0] = 1.0
    full[..., c0:c1] = probs
    return full


def segment(model: SegmentationModel, images: SagittalImages, canal_mean_lps: np.ndarray | None = None
            ) -> SegmentationResult:
    """Segment L1–L4 on the candidates; the result lies on the candidates' central plane (exact LPS mapping)."""
    fused = fuse_probabilities(candidate_probabilities(model, images, canal_mean_lps))
    return postprocess(fused, images.candidate_geometry.central_plane())
