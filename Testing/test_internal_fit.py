"""The scanner-response fit (LumbarBMDLib.internal_calibration.fit, issue 15).

Two kinds of truth:

* *table spectra*: the committed response table holds, per grid spectrum, the exact element mean attenuations of
  physics.py's model, so the exact HU of any material on that spectrum follow without spekpy (these tests always
  run);
* *physics scanners* (spekpy + xraydb, skipped without the phantom-physics extra): physics.py's full polyenergetic
  model on scanners off the grid, including a profile never used while developing the method (``UNSEEN``: 135 kVp,
  anode 9°, 7.5 mm Al + 0.15 mm Cu, 31 cm, water +4 / air −5 HU).

What accuracy is achievable, and why (measured by benchmarks/bench_internal_fit.py, quoted in the README): the
K2HPO4 slope falls by ≈ 2 % per keV of effective energy, while fat, the tissue that carries the energy
information, moves by only ≈ 1 HU per keV against a between-person SD of ≈ 10 HU. With realistic biology the BMD
error is therefore ≈ ±5–15 % (95 % limits), not ±2 %; ±2 % holds when the tissues are their reference compositions
(the model chain itself), which is what the strict tests check, and the realistic tests check that the fit's own
stated uncertainty (slope_sd) covers its error.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from LumbarBMDLib.calibration import ScannerCalibration
from LumbarBMDLib.internal_calibration import fit
from LumbarBMDLib.phantom import physics as ph

TISSUES = ("air", "subcutaneous_fat", "visceral_fat", "muscle", "blood")


def row_hu(row: dict, material: ph.Material, w: float = 0.0, a: float = 0.0) -> float:
    """Exact HU of ``material`` on a table spectrum with calibration error (w, a) (physics.py's equations)."""
    table = fit.load_table()
    mu = dict(zip(table["elements"], row["mu_rho"]))

    def mean_mu(m: ph.Material) -> float:
        return m.density_g_cm3 * sum(f * mu[el] for el, f in m.mass_fractions)

    ideal = 1000.0 * (mean_mu(material) - mean_mu(ph.WATER)) / (mean_mu(ph.WATER) - mean_mu(ph.AIR))
    return w + ideal * (1000.0 + w - a) / 1000.0


def row_k2hpo4(row: dict, w: float = 0.0, a: float = 0.0) -> tuple[float, float]:
    """Exact (slope, intercept) of the K2HPO4 line on a table spectrum."""
    return (row_hu(row, ph.k2hpo4_solution(200.0), w, a) - row_hu(row, ph.WATER, w, a)) / 200.0, w


def find_row(kvp: float, al: float, cu: float, patient: float) -> dict:
    for r in fit.load_table()["rows"]:
        if (r["kvp"], r["filtration_mm_al"], r["filtration_mm_cu"], r["patient_water_cm"]) == (kvp, al, cu, patient):
            return r
    raise KeyError((kvp, al, cu, patient))


def exact_tissues(row: dict, w: float = 0.0, a: float = 0.0, names=TISSUES) -> dict:
    """Noise-free measurements of the reference compositions on a table spectrum."""
    return {n: (row_hu(row, fit.REFERENCE_TISSUES[n].material, w, a), 0.0, 1000) for n in names}


def bmd_errors(cal: fit.InternalCalibration, slope: float, intercept: float) -> list[float]:
    return [100.0 * (cal.bmd_from_hu(intercept + slope * c) - c) / c for c in (50.0, 100.0, 200.0)]


# ---------------------------------------------------------------------------------------------------------------
# The model chain (table spectra, no spekpy)


def test_response_curve_reproduces_the_table_k2hpo4_slope():
    """Spectral shape at fixed effective energy: ≤ 0.6 % of the K2HPO4 slope with the kVp known, ≤ 6 % without."""
    for kvp_known, limit in ((True, 0.6), (False, 6.5)):
        worst = 0.0
        for r in fit.load_table()["rows"]:
            curve = fit.response_curve(r["kvp"] if kvp_known else None)
            slope, _ = fit.k2hpo4_line(curve, r["effective_energy_kev"], 0.0, 0.0)
            worst = max(worst, abs(100.0 * (slope / row_k2hpo4(r)[0] - 1.0)))
        assert worst < limit, (kvp_known, worst)


@pytest.mark.parametrize("kvp,al,cu,patient", [(80, 3, 0, 15), (100, 6, 0, 25), (120, 9, 0.2, 35),
                                               (140, 12, 0.4, 25), (120, 6, 0, 45), (90, 12, 0.4, 35)])
@pytest.mark.parametrize("w,a", [(0.0, 0.0), (5.0, -5.0), (-5.0, 5.0)])
def test_exact_tissues_recover_bmd_within_2_percent(kvp, al, cu, patient, w, a):
    """Tissues that are exactly their reference compositions (floors × 0.05): BMD within ±2 % at 50/100/200."""
    row = find_row(kvp, al, cu, patient)
    cal = fit.fit_scanner_response(exact_tissues(row, w, a), kvp=kvp, patient_water_cm=patient, floor_scale=0.05)
    assert cal.ok, cal.message
    assert abs(cal.effective_energy_kev - row["effective_energy_kev"]) < 0.5
    assert abs(cal.water_offset_hu - w) < 1.0 and abs(cal.air_offset_hu - a) < 1.0
    slope, intercept = row_k2hpo4(row, w, a)
    assert max(abs(e) for e in bmd_errors(cal, slope, intercept)) < 2.0


def test_realistic_noise_and_biology_error_is_covered_by_the_stated_uncertainty():
    """Biology and ROI noise on grid spectra: |slope error| ≤ 3 slope_sd + 1 % in ≥ 95 % of fits, all fits ok."""
    rng = np.random.default_rng(7)
    rows = fit.load_table()["rows"]
    covered, errors = [], []
    for i in rng.choice(len(rows), 60, replace=False):
        r = rows[int(i)]
        w, a = rng.uniform(-5, 5, 2)
        meas = {}
        for name in TISSUES:
            ref = fit.REFERENCE_TISSUES[name]
            sd, n = 20.0, 1500
            se = fit.MEDIAN_EFFICIENCY * sd * math.sqrt(fit.NOISE_CORRELATION_VOXELS / n)
            meas[name] = (row_hu(r, ref.material, w, a) + rng.normal(0, ref.floor_hu) + rng.normal(0, se), sd, n)
        cal = fit.fit_scanner_response(meas, kvp=r["kvp"], patient_water_cm=r["patient_water_cm"])
        slope, intercept = row_k2hpo4(r, w, a)
        covered.append(abs(cal.slope - slope) <= 3 * cal.slope_sd + 0.01 * slope)
        errors += bmd_errors(cal, slope, intercept)
    assert np.mean(covered) >= 0.95
    assert np.percentile(np.abs(errors), 95) < 20.0  # the achievable accuracy (module docstring), not ±2 %


# ---------------------------------------------------------------------------------------------------------------
# Physics scanners off the grid (spekpy)


@pytest.fixture(scope="module")
def physics_extra():
    pytest.importorskip("xraydb", reason="the phantom-physics extra (xraydb) is not installed")
    pytest.importorskip("spekpy", reason="the phantom-physics extra (spekpy) is not installed")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_internal_fit.py"
    spec = importlib.util.spec_from_file_location("bench_internal_fit", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    return bench


UNSEEN = dict(kvp=135.0, anode_angle_deg=9.0, filtration_mm_al=7.5, filtration_mm_cu=0.15, patient_water_cm=31.0,
              water_offset_hu=4.0, air_offset_hu=-5.0, noise_sd_hu=18.0)


@pytest.mark.parametrize("profile", [
    dict(kvp=80.0, filtration_mm_al=4.0, patient_water_cm=22.0, water_offset_hu=-5.0, air_offset_hu=5.0),
    dict(kvp=100.0, filtration_mm_al=8.0, patient_water_cm=28.0, water_offset_hu=3.0),
    dict(kvp=120.0, filtration_mm_al=6.0, patient_water_cm=25.0),
    dict(kvp=140.0, filtration_mm_al=10.0, filtration_mm_cu=0.1, patient_water_cm=38.0, air_offset_hu=-4.0),
    UNSEEN,
], ids=["80kVp", "100kVp", "120kVp", "140kVp", "unseen"])
def test_physics_scanners_exact_tissues_within_2_percent(physics_extra, profile):
    """physics.py's polyenergetic model, off the grid (anode angle, filtration, size): ±2 % with exact tissues."""
    bench = physics_extra
    sc = ph.ScannerPhysics(name="test", **profile)
    true = bench.truth(sc)
    meas = bench.synthetic_measurements(replace(sc, noise_sd_hu=0.0), np.random.default_rng(1), bio_scale=0.0)
    cal = fit.fit_scanner_response(meas, kvp=sc.kvp, patient_water_cm=sc.patient_water_cm, floor_scale=0.05)
    assert cal.ok, cal.message
    assert max(abs(e) for e in bmd_errors(cal, true.slope, true.intercept)) < 2.0, cal.message


def test_physics_scanners_realistic(physics_extra):
    """Realistic biology and noise on 12 random physics scanners (+ the unseen profile): within the achievable
    accuracy, and the fit's verdict is ok for the plain cases."""
    bench = physics_extra
    rng = np.random.default_rng(2024)
    scanners = [bench.random_scanner(rng, f"r{i}") for i in range(12)] + [ph.ScannerPhysics(name="unseen", **UNSEEN)]
    errors, oks = [], 0
    for sc in scanners:
        true = bench.truth(sc)
        cal = fit.fit_scanner_response(bench.synthetic_measurements(sc, rng), kvp=sc.kvp,
                                       patient_water_cm=sc.patient_water_cm)
        oks += cal.ok
        errors += bmd_errors(cal, true.slope, true.intercept)
    assert oks >= len(scanners) - 1
    assert np.max(np.abs(errors)) < 25.0


# ---------------------------------------------------------------------------------------------------------------
# Verdicts


@pytest.fixture()
def row120():
    return find_row(120, 6, 0, 25)


def test_missing_tissue_is_poor(row120):
    meas = exact_tissues(row120)
    del meas["muscle"]
    cal = fit.fit_scanner_response(meas, kvp=120)
    assert cal.verdict == "poor"
    assert any("missing: muscle" in r for r in cal.reasons)
    assert "poor" in cal.message


def test_too_few_tissues_is_poor(row120):
    cal = fit.fit_scanner_response(exact_tissues(row120, names=("air", "subcutaneous_fat", "muscle")), kvp=120)
    assert cal.verdict == "poor" and any("Too few" in r for r in cal.reasons)


def test_absurd_residual_is_poor(row120):
    meas = exact_tissues(row120)
    meas["muscle"] = (300.0, 15.0, 1500)
    cal = fit.fit_scanner_response(meas, kvp=120)
    assert cal.verdict == "poor"
    assert any(r.startswith("muscle reads 300 HU") for r in cal.reasons), cal.reasons


def test_enhanced_blood_is_excluded(row120):
    meas = exact_tissues(row120)
    meas["aorta"] = (250.0, 20.0, 800)
    cal = fit.fit_scanner_response(meas, kvp=120, blood_enhanced=True)
    excluded = [t for t in cal.tissues if not t.used]
    assert {t.name for t in excluded} == {"blood", "aorta"}
    assert all("contrast" in t.note for t in excluded)
    assert cal.ok, cal.message  # air, two fats and muscle remain
    assert any("contrast-enhanced" in n for n in cal.notes)
    # without the flag the enhanced aorta is off the model: left out (one tissue may be), said so, the fit redone
    unflagged = fit.fit_scanner_response(meas, kvp=120)
    aorta = next(t for t in unflagged.tissues if t.name == "aorta")
    assert not aorta.used and "left out" in aorta.note and unflagged.ok
    assert any(n.startswith("aorta read 250 HU") for n in unflagged.notes), unflagged.notes
    assert unflagged.slope == pytest.approx(cal.slope, rel=0.01)
    # a second tissue off the model makes it poor
    meas["ivc"] = (240.0, 20.0, 800)
    assert fit.fit_scanner_response(meas, kvp=120).verdict == "poor"


def test_energy_out_of_range_is_poor():
    row = find_row(140, 12, 0.4, 45)  # 95.9 keV
    cal = fit.fit_scanner_response(exact_tissues(row), kvp=140, patient_water_cm=45, floor_scale=0.05)
    assert cal.verdict == "poor"
    assert any("outside the 50–90 keV" in r for r in cal.reasons), cal.reasons


def test_dicom_kvp_contradicting_the_tissues_is_poor():
    row = find_row(80, 3, 0, 25)  # ≈ 57 keV
    meas = exact_tissues(row, names=(*TISSUES, "cortical_bone"))
    cal = fit.fit_scanner_response(meas, kvp=140, patient_water_cm=25)
    assert cal.verdict == "poor"
    assert any("DICOM kVp 140" in r for r in cal.reasons), cal.reasons
    assert fit.fit_scanner_response(meas, kvp=80, patient_water_cm=25).ok


def test_metal_is_poor(row120):
    cal = fit.fit_scanner_response(exact_tissues(row120), kvp=120, metal=True)
    assert cal.verdict == "poor" and any("Metal" in r for r in cal.reasons)


def test_unknown_tissue_is_ignored_with_a_note(row120):
    meas = exact_tissues(row120)
    meas["liver"] = (60.0, 15.0, 2000)
    cal = fit.fit_scanner_response(meas, kvp=120)
    assert cal.ok and any("'liver'" in n for n in cal.notes)


def test_no_kvp_fits_on_tissues_alone(row120):
    cal = fit.fit_scanner_response(exact_tissues(row120), floor_scale=0.05)
    assert cal.ok and cal.kvp is None and any("No DICOM kVp" in n for n in cal.notes)
    assert abs(cal.effective_energy_kev - row120["effective_energy_kev"]) < 3.0


def test_bad_measurement_is_refused():
    with pytest.raises(fit.LumbarBMDError):
        fit.fit_scanner_response({"air": ("x", 1, 1)})


# ---------------------------------------------------------------------------------------------------------------
# Outputs


def test_as_dict_round_trips_through_json(row120):
    meas = exact_tissues(row120)
    meas["muscle"] = (45.0, 14.0, 1500, {"label": "paraspinal", "slices": [40, 60]})
    cal = fit.fit_scanner_response(meas, kvp=120, patient_water_cm=25)
    d = cal.as_dict()
    text = json.dumps(d, allow_nan=False)
    back = fit.InternalCalibration.from_dict(json.loads(text))
    assert back.as_dict() == d
    assert back.bmd_from_hu(150.0) == pytest.approx(cal.bmd_from_hu(150.0))
    assert d["tissues"][3]["roi"]["label"] == "paraspinal"
    poor = fit.fit_scanner_response({"air": (-1000.0, 5.0, 100)})
    json.dumps(poor.as_dict(), allow_nan=False)  # NaN written as null
    assert fit.InternalCalibration.from_dict(json.loads(json.dumps(poor.as_dict()))).verdict == "poor"


def test_reference_scale_matches_scanner_calibration(row120):
    cal = fit.fit_scanner_response(exact_tissues(row120), kvp=120)
    ref = ScannerCalibration(1.10, 5.0)
    hu = np.array([0.0, 100.0, 250.0])
    mapped = cal.to_reference_scale(hu, ref)
    np.testing.assert_allclose((mapped - ref.intercept) / ref.slope, cal.bmd_from_hu(hu))
    a, b = cal.as_scanner_calibration().to_reference(ref)
    np.testing.assert_allclose(mapped, a * hu + b)
    assert cal.to_reference_scale(100.0, ref) == pytest.approx(float(mapped[1]))


def test_choose_calibration_phantom_wins_then_internal_then_nominal(row120):
    good = fit.fit_scanner_response(exact_tissues(row120), kvp=120)
    poor = fit.fit_scanner_response(exact_tissues(row120), kvp=120, metal=True)
    phantom = ScannerCalibration(1.2, -3.0)
    c = fit.choose_calibration(phantom, good)
    assert c.source == "phantom" and c.slope == 1.2 and "not used" in c.sentence
    c = fit.choose_calibration(None, good)
    assert c.source == "internal" and c.slope == pytest.approx(good.slope)
    c = fit.choose_calibration(None, poor, kvp=120)
    slope, intercept, e = fit.nominal_line(120)
    assert c.source == "nominal" and "Metal" in c.sentence and "120 kVp" in c.sentence
    assert (c.slope, c.intercept, c.effective_energy_kev) == (slope, intercept, e) and intercept == 0.0
    assert "no reference tissue" in fit.choose_calibration(None, None).sentence


def test_nominal_line_follows_the_tube_voltage():
    """Softer beams read mineral higher: the nominal K2HPO4 slope falls as the kVp rises, and a larger patient
    (harder beam) lowers it; without a kVp the nominal scanner is 120 kVp."""
    slopes = [fit.nominal_line(k)[0] for k in (80, 100, 120, 140)]
    assert all(a > b for a, b in zip(slopes, slopes[1:])), slopes
    assert fit.nominal_line(None) == fit.nominal_line(120)
    assert fit.nominal_line(120, patient_water_cm=40)[0] < fit.nominal_line(120, patient_water_cm=20)[0]
    assert 1.2 < fit.nominal_line(120)[0] < 1.5  # K2HPO4 at 120 kVp (test_physics.py)


def test_fit_is_fast(row120):
    meas = exact_tissues(row120)
    fit.fit_scanner_response(meas, kvp=120)
    t0 = time.perf_counter()
    for _ in range(5):
        fit.fit_scanner_response(meas, kvp=120, patient_water_cm=25)
    assert (time.perf_counter() - t0) / 5 < 0.1


def test_filtration_prior_is_the_scanners_effective_energy_and_narrows_the_fit():
    """A site's stated filtration (``--scanner-spec``) gives the effective energy its spectrum has: the table's
    interpolation matches the physics of the phantom's vendors (within 0.2 keV) with an SD under 1 keV, against
    2.2 keV for the kVp alone; with it the exact tissues of a 6 mm Al, 120 kVp scanner give its own K2HPO4 slope
    more closely than with the kVp's prior over all filtrations."""
    from LumbarBMDLib.phantom.scanner import SCANNERS, VENDOR_EFFECTIVE_ENERGY_KEV, VENDOR_PHYSICS

    for v, phys in VENDOR_PHYSICS.items():
        mean, sd = fit.energy_prior_from_filtration(phys.kvp, phys.filtration_mm_al, phys.filtration_mm_cu,
                                                    phys.patient_water_cm)
        assert mean == pytest.approx(VENDOR_EFFECTIVE_ENERGY_KEV[v], abs=0.2) and 0.5 <= sd < 1.0, (v, mean, sd)
    assert fit.energy_prior(120, 28)[1] > 2.0
    unknown_size = fit.energy_prior_from_filtration(120, 6, 0)
    assert unknown_size[1] > fit.energy_prior_from_filtration(120, 6, 0, 28)[1]  # the size's spread adds
    a = SCANNERS["A"]
    meas = {"air": (-1000.0 + VENDOR_PHYSICS["A"].air_offset_hu, 5.0, 5000), "subcutaneous_fat": (a.fat_hu, 12.0, 5000),
            "visceral_fat": (a.fat_hu, 12.0, 5000), "paraspinal_muscle": (a.muscle_hu, 12.0, 3000),
            "aorta": (a.blood_hu, 10.0, 800), "ivc": (a.blood_hu, 10.0, 800)}
    plain = fit.fit_scanner_response(meas, kvp=120, patient_water_cm=28)
    stated = fit.fit_scanner_response(meas, kvp=120, patient_water_cm=28, filtration=(6.0, 0.0))
    assert stated.ok and any("site's filtration" in n for n in stated.notes)
    assert abs(stated.slope / a.bone_slope - 1) < 0.02 < abs(plain.slope / a.bone_slope - 1)
    assert stated.effective_energy_sd_kev < plain.effective_energy_sd_kev
    nominal = fit.choose_calibration(None, None, 120, 28, (6.0, 0.0))
    assert nominal.source == "nominal" and abs(nominal.slope / a.bone_slope - 1) < 0.03
