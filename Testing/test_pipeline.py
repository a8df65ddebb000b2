"""The whole method with the shipped default models on phantom CTs: results contract, accuracy, edited labels,
scanner calibration and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from LumbarBMDLib.calibration import fit_calibration
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.localisation import REASON_NOT_LABELLED
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.phantom.calibration_scan import calibration_scan
from LumbarBMDLib.pipeline import measure, measure_from_labels, results_json
from LumbarBMDLib.regression import RegressionModel
from LumbarBMDLib.segmentation import SegmentationModel
from LumbarBMDLib.volume import CTVolume


@pytest.fixture(scope="module")
def models():
    return SegmentationModel.load(device="cpu"), RegressionModel.load(device="cpu")


@pytest.fixture(scope="module")
def case_b():
    return generate_case(99_001, "B", "small")  # a seed and a vendor never used in training


def test_default_models_have_model_cards(models):
    seg, bmd = models
    for model in (seg, bmd):
        assert model.card["sha256"] == model.sha256
        assert model.card["metrics"] and model.card["training"]["vendors"] == ["A"]
    assert bmd.card["reference_calibration"]["slope"] == pytest.approx(1.10, rel=0.02)


def test_end_to_end_on_an_unseen_vendor_with_calibration(models, case_b):
    seg, bmd = models
    calibration = fit_calibration(calibration_scan("B"))
    result = measure(case_b.ct, seg, bmd, calibration)
    assert result.status == "ok", [lv.reason for lv in result.levels]
    for lv in result.levels:
        truth = case_b.truth["bmd_mg_cm3"][lv.level]
        assert abs(lv.bmd_mg_cm3 - truth) < 12.0, (lv.level, lv.bmd_mg_cm3, truth)
    res = results_json(result, "case_b", seg, bmd)
    json.dumps(res)  # serialisable
    assert res["status"] == "ok" and res["error"] is None and len(res["vertebrae"]) == 4
    assert {"level", "found", "bmd_mg_cm3", "category", "centre_lps", "confidence"} <= set(res["vertebrae"][0])
    assert set(res["timings_s"]) >= {"canal", "segment", "regress", "total"}
    assert res["models"] == {"segmentation": seg.sha256, "regression": bmd.sha256}
    assert res["mean_bmd_mg_cm3"] == pytest.approx(np.mean([v["bmd_mg_cm3"] for v in res["vertebrae"]]), abs=0.06)
    # the same case measured again gives the same numbers (determinism)
    again = measure(case_b.ct, seg, bmd, calibration)
    assert [lv.bmd_mg_cm3 for lv in again.levels] == [lv.bmd_mg_cm3 for lv in result.levels]

    # a radiologist erases L4 and re-runs: L4 is reported missing, the others keep their values
    edited = result.labels.copy()
    edited[edited == 4] = 0
    redo = measure_from_labels(result.annotation, edited, result.label_geometry, bmd, calibration)
    assert redo.status == "partial" and redo.levels[3].reason == REASON_NOT_LABELLED
    for a, b in zip(redo.levels[:3], result.levels[:3], strict=True):
        assert a.bmd_mg_cm3 == pytest.approx(b.bmd_mg_cm3)
    assert results_json(redo, "case_b", None, bmd)["vertebrae"][3]["found"] is False


def test_no_spine_in_view_is_a_clear_error(models):
    seg, bmd = models
    hu = np.full((40, 128, 128), -1000, np.int16)
    hu[:, 20:108, 20:108] = 40  # a block of soft tissue, no bone
    with pytest.raises(LumbarBMDError, match="no spinal canal"):
        measure(CTVolume(hu=hu, spacing=(2.0, 2.0, 2.5), origin=(0.0, 0.0, 0.0)), seg, bmd)


def test_progress_is_reported_before_each_stage_and_can_cancel(models, case_b):
    from LumbarBMDLib.errors import ComputationCancelled
    from LumbarBMDLib.pipeline import MEASURE_STAGES

    seg, bmd = models
    seen = []
    result = measure(case_b.ct, seg, bmd, progress=lambda fraction, message: seen.append((fraction, message)))
    assert seen == list(MEASURE_STAGES.values()) and result.status == "ok"
    assert [f for f, _ in seen] == sorted(f for f, _ in seen)

    def cancel_at_regression(fraction, message):
        if fraction >= MEASURE_STAGES["regress"][0]:
            raise ComputationCancelled("cancelled by the user")

    with pytest.raises(ComputationCancelled):
        measure(case_b.ct, seg, bmd, progress=cancel_at_regression)
