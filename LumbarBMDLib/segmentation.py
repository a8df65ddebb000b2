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
from LumbarBMDLib.sagittal import NETWORK_WINDOW_COLUMNS, SagittalImages, network_window
from LumbarBMDLib.seg_training import resolve_device
from LumbarBMDLib.segmentation_post import SegmentationResult, fuse_probabilities, postprocess
from LumbarBMDLib.weights import architecture_field, check_fits, load_model

WINDOW_COLUMNS = NETWORK_WINDOW_COLUMNS


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
    verified: bool = True  # False: the card had no sha256 and the caller accepted an unverified model

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "auto", *,
             allow_unverified: bool = False) -> SegmentationModel:
        """Load ``path`` (default: the shipped ``segmentation.safetensors``) and its ``.json`` model card, checked
        (:func:`~LumbarBMDLib.weights.load_model`); ``allow_unverified`` accepts a card without sha256."""
        path = Path(path) if path else models_dir() / "segmentation.safetensors"
        weights = load_model(path, "segmentation", allow_unverified)
        arch = {key: architecture_field(weights.card, path, key, kind, "segmentation")
                for key, kind in (("in_channels", int), ("out_channels", int), ("features", list), ("t", int))}
        card_path = path.with_suffix(".json")
        if (arch["in_channels"], arch["out_channels"]) != (1, 5):  # one sagittal slice in; background + L1–L4 out
            raise LumbarBMDError(f"model card {card_path}: a segmentation model takes 1 input channel and gives 5 "
                                 f"classes, this one {arch['in_channels']} and {arch['out_channels']}")
        try:
            with torch.device("meta"):
                probe = R2UNet(arch["in_channels"], arch["out_channels"], tuple(arch["features"]), arch["t"])
        except ValueError as err:
            raise LumbarBMDError(f"model card {card_path} does not describe an R2U-Net: {err}") from None
        check_fits(probe, weights.tensors, path, "segmentation")
        net = R2UNet(arch["in_channels"], arch["out_channels"], tuple(arch["features"]), arch["t"])
        try:
            net.load_state_dict(weights.tensors)
        except RuntimeError as err:
            raise LumbarBMDError(
                f"segmentation weights {path} do not fit the architecture in its model card: {err}"
            ) from None
        dev = resolve_device(device)
        return cls(net.to(dev).eval(), weights.card, weights.sha256, dev, weights.verified)


def window_columns(images: SagittalImages, canal_mean_lps: np.ndarray | None) -> tuple[int, int]:
    """The column range (anterior → posterior) the network runs on (:func:`~LumbarBMDLib.sagittal.network_window`)."""
    size = images.candidates_hu.shape[-1]
    if canal_mean_lps is None:
        return 0, size
    col = images.candidate_geometry.lps_to_pixel(np.asarray(canal_mean_lps, dtype=float))[0]
    return network_window(float(col), size)


#: The network's input rows are a multiple of this (its four 2 × 2 max-pools).
ROW_MULTIPLE = 16


def window_rows(rows: tuple[int, int] | None, size: int) -> tuple[int, int]:
    """``rows`` (first, last + 1) grown to a multiple of ``ROW_MULTIPLE`` inside the image; all rows when None."""
    if rows is None:
        return 0, size
    r0, r1 = max(0, int(rows[0])), min(size, int(rows[1]))
    extra = (-(r1 - r0)) % ROW_MULTIPLE
    r0 = max(0, r0 - extra // 2)
    r1 = min(size, r0 + (r1 - r0) + extra)
    r0 = max(0, r1 - ((r1 - r0 + ROW_MULTIPLE - 1) // ROW_MULTIPLE) * ROW_MULTIPLE)
    return r0, r1


@torch.inference_mode()
def candidate_probabilities(model: SegmentationModel, images: SagittalImages,
                            canal_mean_lps: np.ndarray | None = None, rows: tuple[int, int] | None = None
                            ) -> np.ndarray:
    """Softmax probabilities of the 10 candidates, float32 ``(10, 5, 512, 512)`` (background outside the window).

    ``rows`` restricts the network to those image rows (e.g. the identified L1–L4 with a margin: the network is
    fully convolutional, and the time falls with the rows).
    """
    x = images.network_input()
    c0, c1 = window_columns(images, canal_mean_lps)
    r0, r1 = window_rows(rows, x.shape[2])
    logits = model.network(torch.from_numpy(np.ascontiguousarray(x[:, :, r0:r1, c0:c1])).to(model.device))
    if not bool(torch.isfinite(logits).all()):
        raise LumbarBMDError("the segmentation model gave non-finite output (NaN or infinity) for this case: its "
                             "weights are damaged or unsuited; no segmentation was made")
    probs = torch.softmax(logits, dim=1).cpu().numpy()
    full = np.zeros((x.shape[0], probs.shape[1], *x.shape[2:]), np.float32)
    full[:, 0] = 1.0
    full[:, :, r0:r1, c0:c1] = probs
    return full


def segment(model: SegmentationModel, images: SagittalImages, canal_mean_lps: np.ndarray | None = None,
            rows: tuple[int, int] | None = None) -> SegmentationResult:
    """Segment L1–L4 on the candidates; the result lies on the candidates' central plane (exact LPS mapping)."""
    fused = fuse_probabilities(candidate_probabilities(model, images, canal_mean_lps, rows))
    return postprocess(fused, images.candidate_geometry.central_plane())


def segmentation_json(result: SegmentationResult, model: SegmentationModel, canal_json: dict | None = None) -> dict:
    """The per-level summary written by ``lumbarbmd segment`` (status, missing levels, centres, confidence)."""
    return {
        "status": result.status,
        "missing": result.missing,
        "vertebrae": [
            {
                "level": lv.level,
                "found": lv.found,
                "reason": lv.reason or None,
                "centre_lps": None if lv.centre_lps is None else [round(float(c), 3) for c in lv.centre_lps],
                "area_mm2": round(float(lv.area_mm2), 1),
                "confidence": round(float(lv.confidence), 4),
            }
            for lv in result.levels
        ],
        "model": {"sha256": model.sha256, "features": model.card["architecture"]["features"]},
        "canal": canal_json,
    }


def write_segmentation(out_dir: str | Path, images: SagittalImages, result: SegmentationResult, summary: dict) -> Path:
    """Write ``sagittal.nii.gz`` (20-slice mean image), ``sagittal_labels.nii.gz`` (L1–L4, same grid, overlays the
    CT), ``segmentation.json`` and ``segmentation_preview.png`` into ``out_dir`` atomically."""
    import shutil
    import tempfile

    from LumbarBMDLib.segmentation_post import label_image_to_sitk
    from LumbarBMDLib.volume import write_image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".segment.", dir=out_dir))
    names = ("sagittal.nii.gz", "sagittal_labels.nii.gz", "segmentation.json")
    try:
        write_image(result.geometry.to_sitk(images.annotation_hu.astype(np.float32)), tmp / names[0])
        write_image(label_image_to_sitk(result), tmp / names[1])
        (tmp / names[2]).write_text(json.dumps(summary, indent=1), encoding="utf-8")
        for name in names:
            os.replace(tmp / name, out_dir / name)
        _preview(images, result, out_dir / "segmentation_preview.png")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _preview(images: SagittalImages, result: SegmentationResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from LumbarBMDLib.figures import WINDOW_HU, overlay_levels

    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(images.annotation_hu, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1])
    overlay_levels(ax, result.labels)
    for lv in result.levels:
        if lv.found:
            ax.text(lv.centre_pixel[0] - 60, lv.centre_pixel[1], f"{lv.level} {lv.confidence:.2f}", color="w",
                    fontsize=8)
    ax.set_title(f"L1–L4 segmentation ({result.status})")
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
