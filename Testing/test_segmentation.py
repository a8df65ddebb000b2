"""R2U-Net inference on the sagittal candidates: model loading (safetensors + card), window, fusion, geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from LumbarBMDLib.annotation import prepare
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.r2unet import count_parameters, r2unet_from_width
from LumbarBMDLib.seg_training import save_model
from LumbarBMDLib.segmentation import (
    WINDOW_COLUMNS,
    SegmentationModel,
    candidate_probabilities,
    segment,
    window_columns,
)


def _card(width: int, params: int) -> dict:
    return {
        "model": "test",
        "architecture": {
            "name": "R2UNet",
            "in_channels": 1,
            "out_channels": 5,
            "t": 2,
            "features": [width * 2**i for i in range(5)],
            "parameters": params,
        },
    }


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    net = r2unet_from_width(4)
    path = tmp_path_factory.mktemp("model") / "segmentation.safetensors"
    save_model(net, path, _card(4, count_parameters(net)))
    return path


@pytest.fixture(scope="module")
def prepared():
    return prepare(generate_case(41, "A", "small").ct)


def test_load_checks_card_and_weights(tiny_model, tmp_path):
    model = SegmentationModel.load(tiny_model, device="cpu")
    assert model.sha256 == json.loads(tiny_model.with_suffix(".json").read_text(encoding="utf-8"))["sha256"]
    assert not model.network.training
    with pytest.raises(LumbarBMDError, match="not found"):
        SegmentationModel.load(tmp_path / "missing.safetensors")
    # a weights file that no longer matches its card is refused
    bad = tmp_path / "segmentation.safetensors"
    bad.write_bytes(tiny_model.read_bytes()[:-8] + b"\0" * 8)
    bad.with_suffix(".json").write_text(tiny_model.with_suffix(".json").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(LumbarBMDError):
        SegmentationModel.load(bad)
    # a card whose architecture does not fit the weights is refused with a clear message
    card = json.loads(tiny_model.with_suffix(".json").read_text(encoding="utf-8"))
    card["architecture"]["features"] = [8, 16, 32, 64, 128]
    card.pop("sha256")
    other = tmp_path / "other.safetensors"
    other.write_bytes(tiny_model.read_bytes())
    other.with_suffix(".json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(LumbarBMDError, match="has no sha256"):  # no sha256: refused unless explicitly allowed
        SegmentationModel.load(other)
    with pytest.raises(LumbarBMDError, match="do not fit the architecture"):
        SegmentationModel.load(other, allow_unverified=True)


def test_window_is_centred_in_front_of_the_canal(prepared):
    images, canal = prepared.images, prepared.canal
    c0, c1 = window_columns(images, canal.mean_centre_lps)
    assert c1 - c0 == WINDOW_COLUMNS and 0 <= c0 and c1 <= 512
    canal_col = images.candidate_geometry.lps_to_pixel(canal.mean_centre_lps)[0]
    assert c0 + 0.25 * WINDOW_COLUMNS < canal_col < c1  # canal inside, the bodies (anterior = left) too
    assert window_columns(images, None) == (0, 512)


def test_candidate_probabilities_and_segment(tiny_model, prepared):
    model = SegmentationModel.load(tiny_model, device="cpu")
    images, canal = prepared.images, prepared.canal
    probs = candidate_probabilities(model, images, canal.mean_centre_lps)
    assert probs.shape == (10, 5, 512, 512) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    c0, c1 = window_columns(images, canal.mean_centre_lps)
    assert np.all(probs[:, 0, :, :c0] == 1.0) and np.all(probs[:, 0, :, c1:] == 1.0)
    result = segment(model, images, canal.mean_centre_lps)
    assert result.labels.shape == (512, 512) and result.labels.dtype == np.uint8
    assert result.geometry.n_slices == 1
    # the label image lies on the canal's sagittal plane
    assert result.geometry.origin_lps[0] == pytest.approx(images.candidate_geometry.sagittal_x_lps, abs=1e-6)
    assert [lv.level for lv in result.levels] == ["L1", "L2", "L3", "L4"]
    assert result.status in ("ok", "partial")
    for lv in result.levels:  # an untrained model finds little; whatever it reports is self-consistent
        if lv.found:
            assert 0.0 < lv.confidence <= 1.0
            np.testing.assert_allclose(lv.centre_lps, result.geometry.pixel_to_lps([*lv.centre_pixel, 0.0]))
        else:
            assert not (result.labels == lv.label).any()


def test_segment_command_writes_overlaying_files(tiny_model, tmp_path):
    import subprocess
    import sys

    import SimpleITK as sitk

    from LumbarBMDLib.phantom import write_case

    case_dir = write_case(generate_case(42, "B", "small"), tmp_path / "in")

    def segment_cli(out_name: str, model) -> subprocess.CompletedProcess:
        args = ["segment", str(case_dir / "ct.nii.gz"), "--out", str(tmp_path / out_name), "--model", str(model)]
        return subprocess.run(
            [sys.executable, "-m", "LumbarBMDLib", *args, "--device", "cpu"],
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=300,
        )

    out = segment_cli("out", tiny_model)
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "out"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["sagittal.nii.gz", "sagittal_labels.nii.gz", "segmentation.json", "segmentation_preview.png"]
    )
    summary = json.loads((folder / "segmentation.json").read_text(encoding="utf-8"))
    assert [v["level"] for v in summary["vertebrae"]] == ["L1", "L2", "L3", "L4"]
    assert summary["status"] in ("ok", "partial") and summary["model"]["sha256"]
    image, labels = (sitk.ReadImage(str(folder / n)) for n in ("sagittal.nii.gz", "sagittal_labels.nii.gz"))
    assert image.GetSize() == labels.GetSize() == (512, 512, 1)
    for a, b in (
        (image.GetOrigin(), labels.GetOrigin()),
        (image.GetDirection(), labels.GetDirection()),
        (image.GetSpacing(), labels.GetSpacing()),
    ):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert image.GetOrigin()[0] == pytest.approx(summary["canal"]["sagittal_x_lps"], abs=1e-3)
    missing = segment_cli("out2", tmp_path / "nope.safetensors")
    assert missing.returncode == 1 and "segmentation model not found" in missing.stderr
