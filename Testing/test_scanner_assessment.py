"""The scanner and contrast assessment in the pipeline (issue 15, in progress): reference tissues, contrast phase and
the internal calibration are recorded in results.json for every case and the contrast phase is a QC flag; the BMD is
not changed by them (recorded, not applied). Real CTs and phantoms, shipped models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from LumbarBMDLib.internal_calibration.assess import NOT_APPLIED, assess_scanner
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.pipeline import measure, measure_from_labels, results_json
from LumbarBMDLib.regression import RegressionModel
from LumbarBMDLib.report import qc_flags
from LumbarBMDLib.segmentation import SegmentationModel
from LumbarBMDLib.volume import read_ct

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


@pytest.fixture(scope="module")
def models():
    return SegmentationModel.load(device="cpu"), RegressionModel.load(device="cpu")


def _codes(results: dict) -> list[str]:
    return [f["code"] for f in results["qc_flags"]]


def test_real_abdomen_ct_records_tissues_phase_and_fit_without_changing_bmd(models) -> None:
    """The real abdomen CT: its aorta (~40 HU) reads unenhanced, so no contrast flag; air, fat and muscle are found
    with HU in published ranges; the internal calibration is recorded with its verdict and the calibration the
    pipeline would choose; the BMD is what the regression gives without the assessment (hu_transform identity)."""
    seg, bmd = models
    result = measure(read_ct(REAL / "totalseg-example" / "ct.nii.gz"), seg, bmd)
    res = results_json(result, "totalseg-example", seg, bmd)
    json.dumps(res)
    scanner = res["scanner"]
    assert scanner["status"] == NOT_APPLIED
    assert scanner["contrast_phase"]["phase"] == "non_contrast"
    assert "contrast_enhanced" not in _codes(res) and "contrast_phase_unknown" not in _codes(res)
    tissues = scanner["tissues"]["tissues"]
    assert -1010 <= tissues["air"]["median_hu"] <= -970
    assert -150 <= tissues["subcutaneous_fat"]["median_hu"] <= -60
    assert 0 <= tissues["paraspinal_muscle"]["median_hu"] <= 80
    assert scanner["tissues"]["spine_source"] == "given"  # placed from the identified L1–L4 bodies
    fit = scanner["internal_calibration"]
    assert fit["verdict"] in ("ok", "poor") and 40 <= fit["effective_energy_kev"] <= 100
    assert scanner["calibration_choice"]["source"] in ("internal", "none")
    assert result.hu_transform == (1.0, 0.0) and res["calibration"] is None  # recorded, not applied
    assert res["timings_s"]["scanner"] == pytest.approx(scanner["seconds"], abs=0.002)


def test_real_chest_ct_phase_is_measured_not_assumed() -> None:
    """The real chest CT (Philips, 120 kVp, no lumbar spine): its descending aorta reads as unenhanced blood (the
    issue expected a bright aorta; the image shows it as grey as the heart's blood, ~40 HU), and the DICOM kVp is the
    fit's prior."""
    volume = read_ct(REAL / "chest-ct-negative")
    a = assess_scanner(volume)
    assert a.phase.phase == "non_contrast" and a.phase.enhanced is False
    assert 20 <= a.tissues.median("aorta") <= 60
    assert a.calibration is not None and a.calibration.kvp == 120.0
    assert a.qc_flags() == []


def test_contrast_phantom_is_flagged_and_the_flag_reaches_the_report(models) -> None:
    """A phantom of the contrast variant: the flag names the phase and says BMD reads high; an unenhanced phantom of
    the same patient has no such flag. Edited labels keep the case's assessment."""
    seg, bmd = models
    flags = {}
    for variant in ("none", "contrast"):
        case = generate_case(99_011, "A", "small", variant)
        result = measure(case.ct, seg, bmd)
        res = results_json(result, variant, seg, bmd)
        flags[variant] = res
    assert "contrast_enhanced" not in _codes(flags["none"])
    assert flags["none"]["scanner"]["contrast_phase"]["enhanced"] is False
    enhanced = flags["contrast"]
    assert "contrast_enhanced" in _codes(enhanced), enhanced["scanner"]["contrast_phase"]
    assert any("contrast-enhanced CT" in f and "BMD reads high" in f for f in qc_flags(enhanced))
    redo = measure_from_labels(result.annotation, result.labels, result.label_geometry, bmd, scanner=result.scanner)
    assert "contrast_enhanced" in [f.code for f in redo.qc_flags] and redo.scanner is result.scanner
