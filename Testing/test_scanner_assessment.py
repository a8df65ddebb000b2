"""The scanner and contrast assessment in the pipeline (issue 15): reference tissues, contrast phase and the internal
calibration are recorded in results.json for every case, and the chosen calibration (phantom scan, internal or
nominal) and the contrast correction map the HU onto the regression model's reference scale. Real CTs and phantoms,
shipped models."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from LumbarBMDLib.calibration import fit_calibration
from LumbarBMDLib.internal_calibration.assess import assess_scanner
from LumbarBMDLib.internal_calibration.fit import nominal_line
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.phantom.calibration_scan import calibration_scan
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


def test_real_abdomen_ct_is_mapped_by_its_internal_calibration(models) -> None:
    """The real abdomen CT (a NIfTI: no kVp): its aorta (~40 HU) reads unenhanced, so no contrast flag; air, fat and
    muscle are found with HU in published ranges; the internal calibration's effective energy and water/air offsets
    lie where a clinical 80–140 kVp scanner's do, and its K2HPO4 line maps the HU (not the identity); measured with
    the identity instead, the same labels give other values, so the mapping is what the BMD rests on."""
    seg, bmd = models
    result = measure(read_ct(REAL / "totalseg-example" / "ct.nii.gz"), seg, bmd)
    res = results_json(result, "totalseg-example", seg, bmd)
    json.dumps(res)
    scanner = res["scanner"]
    assert scanner["contrast_phase"]["phase"] == "non_contrast"
    assert "contrast_enhanced" not in _codes(res) and "contrast_phase_unknown" not in _codes(res)
    tissues = scanner["tissues"]["tissues"]
    assert -1010 <= tissues["air"]["median_hu"] <= -970
    assert -150 <= tissues["subcutaneous_fat"]["median_hu"] <= -60
    assert 0 <= tissues["paraspinal_muscle"]["median_hu"] <= 80
    assert scanner["tissues"]["spine_source"] == "given"  # placed from the identified L1–L4 bodies
    fit = scanner["internal_calibration"]
    assert fit["verdict"] == "ok", fit["message"]
    assert 60 <= fit["effective_energy_kev"] <= 90 and abs(fit["water_offset_hu"]) <= 10
    assert abs(fit["air_offset_hu"]) <= 15 and 1.0 <= fit["slope"] <= 1.6
    cal = res["calibration"]
    assert cal["source"] == "internal" and cal["contrast_delta_hu"] == 0.0
    assert cal["slope"] == pytest.approx(fit["slope"], abs=1e-4)
    assert result.hu_transform != (1.0, 0.0) and result.applied.hu_transform == result.hu_transform
    assert res["calibration"]["sentence"].startswith("Calibration: internal")
    assert res["timings_s"]["scanner"] == pytest.approx(scanner["seconds"], abs=0.002)
    identity = measure_from_labels(result.annotation, result.labels, result.label_geometry, bmd, assess=False)
    assert identity.hu_transform == (1.0, 0.0)
    assert abs(identity.mean_bmd_mg_cm3 - result.mean_bmd_mg_cm3) > 1.0


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


def test_contrast_phantom_is_corrected_and_the_flag_reaches_the_report(models) -> None:
    """A portal-venous phantom: the flag names the phase, the published correction (scaled to the scanner's iodine
    response) is subtracted, and its BMD comes back to within 5 mg/cm³ of its unenhanced twin's (the same patient),
    where without the correction it reads higher. Edited labels keep the case's assessment."""
    seg, bmd = models
    out = {}
    for variant in ("none", "contrast"):
        case = generate_case(99_011, "A", "small", variant)
        result = measure(case.ct, seg, bmd)
        out[variant] = (result, results_json(result, variant, seg, bmd), case)
    plain, enhanced = out["none"][1], out["contrast"][1]
    assert "contrast_enhanced" not in _codes(plain) and plain["scanner"]["contrast_phase"]["enhanced"] is False
    assert "contrast_enhanced" in _codes(enhanced), enhanced["scanner"]["contrast_phase"]
    assert enhanced["scanner"]["contrast_phase"]["phase"] == "portal_venous"
    assert any("contrast-enhanced CT" in f and "corrected by" in f for f in qc_flags(enhanced))
    truth_delta = out["contrast"][2].truth["levels"]["L2"]["trabecular_enhancement_hu"]
    assert enhanced["calibration"]["contrast_delta_hu"] == pytest.approx(truth_delta / out["contrast"][2].truth[
        "contrast"]["bolus_factor"], rel=0.05)  # the published mean on this scanner (the phantom adds its bolus)
    assert abs(enhanced["mean_bmd_mg_cm3"] - plain["mean_bmd_mg_cm3"]) <= 5.0
    result = out["contrast"][0]
    uncorrected = measure_from_labels(result.annotation, result.labels, result.label_geometry, bmd,
                                      scanner=replace(result.scanner, correction=replace(
                                          result.scanner.correction, applied=False, delta_hu=0.0)))
    assert uncorrected.mean_bmd_mg_cm3 > result.mean_bmd_mg_cm3 + 5.0
    redo = measure_from_labels(result.annotation, result.labels, result.label_geometry, bmd, scanner=result.scanner)
    assert "contrast_enhanced" in [f.code for f in redo.qc_flags] and redo.scanner.phase is result.scanner.phase
    assert redo.mean_bmd_mg_cm3 == pytest.approx(result.mean_bmd_mg_cm3, abs=1e-6)


def test_phantom_scan_calibration_wins_and_a_missing_fit_falls_back_visibly(models) -> None:
    """On a vendor-C phantom, a --calibration scan of that vendor replaces the internal fit (said so, the fit still
    recorded); with no usable tissue the nominal line of the kVp is used and flagged ``calibration_nominal``; each
    gives the BMD its own line implies."""
    seg, bmd = models
    case = generate_case(99_012, "C", "small")
    result = measure(case.ct, seg, bmd)
    assert result.applied.source == "internal"
    phantom = fit_calibration(calibration_scan("C"))
    with_scan = measure_from_labels(result.annotation, result.labels, result.label_geometry, bmd, phantom,
                                    result.scanner)
    res = results_json(with_scan, "c", seg, bmd)
    assert res["calibration"]["source"] == "phantom" and res["calibration"]["phantom_scan"]["slope"] == phantom.slope
    assert "recorded but not used" in res["calibration"]["sentence"]
    assert res["scanner"]["internal_calibration"]["verdict"] == "ok"
    truth = [case.truth["levels"][lv]["bmd_mg_cm3"] for lv in ("L1", "L2", "L3", "L4")]
    assert abs(with_scan.mean_bmd_mg_cm3 - sum(truth) / 4) <= 12.0
    nominal = measure_from_labels(result.annotation, result.labels, result.label_geometry, bmd, None,
                                  replace(result.scanner, calibration=None))
    assert nominal.applied.source == "nominal" and "calibration_nominal" in [f.code for f in nominal.qc_flags]
    assert "100 kVp" in nominal.applied.sentence  # the phantom's in-memory CT carries its tube voltage
    wed = result.scanner.tissues.water_equivalent_diameter_cm
    assert nominal.applied.slope == pytest.approx(nominal_line(100.0, wed)[0])
    # a reloaded Slicer scene has labels but no assessment: measure_from_labels makes it again
    again = measure_from_labels(result.annotation, result.labels, result.label_geometry, bmd)
    assert again.applied.source == "internal" and again.mean_bmd_mg_cm3 == pytest.approx(result.mean_bmd_mg_cm3)


def test_scanner_spec_sets_the_filtration_and_only_a_missing_kvp(tmp_path) -> None:
    """``--scanner-spec``: the filtration goes into the fit's prior (recorded in results.json); the spec's kVp is
    used only when the image has none (a NIfTI), the DICOM kVp wins."""
    from LumbarBMDLib.batch import apply_scanner_spec
    from LumbarBMDLib.phantom.physics import read_scanner_json

    spec = read_scanner_json(Path(__file__).resolve().parents[1] / "docs" / "scanner_example.json")
    case = generate_case(99_013, "A", "small")
    apply_scanner_spec(case.ct, spec)
    assert case.ct.metadata["kvp"] == 120.0 and case.ct.metadata["filtration_mm_al"] == spec.filtration_mm_al
    a = assess_scanner(case.ct)
    assert a.filtration == (spec.filtration_mm_al, spec.filtration_mm_cu)
    assert a.as_json()["filtration_mm"] == {"al": spec.filtration_mm_al, "cu": spec.filtration_mm_cu}
    assert any("site's filtration" in n for n in a.calibration.notes)
    case.ct.metadata.pop("kvp")
    apply_scanner_spec(case.ct, spec)
    assert case.ct.metadata["kvp"] == spec.kvp and case.ct.metadata["kvp_source"] == "scanner spec"
