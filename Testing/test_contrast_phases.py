"""The phantom's contrast phases (arterial, portal venous, delayed): published enhancement per compartment, converted
to iodine and painted with the scanner's iodine HU; the phase detector reads them; unenhanced cases are unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from LumbarBMDLib.internal_calibration.assess import iodine_scale_to_120kvp
from LumbarBMDLib.internal_calibration.phase import POMPE_2015_INCREASE_HU, contrast_phase
from LumbarBMDLib.internal_calibration.tissues import find_reference_tissues
from LumbarBMDLib.phantom import CONTRAST_VARIANTS, generate_case, make_variants
from LumbarBMDLib.phantom.render import (
    BOLUS_VARIATION,
    PUBLISHED_ENHANCEMENT_HU,
    REFERENCE_IODINE_HU_PER_MG_ML,
    Tissue,
    Variants,
)

SEED = 97100
PHASES = {"arterial": "contrast-arterial", "portal_venous": "contrast-portal-venous", "delayed": "contrast-delayed"}


def _centres(case, ids=(1, 2, 3, 4)) -> np.ndarray:
    return np.array([case.ct.index_to_lps(np.argwhere(case.labels == i).mean(axis=0)[::-1]) for i in ids])


@pytest.fixture(scope="module")
def unenhanced():
    return generate_case(SEED, "A", "small", "none")


@pytest.fixture(scope="module", params=list(PHASES), ids=list(PHASES))
def enhanced(request):
    phase = request.param
    case = generate_case(SEED, "A", "small", PHASES[phase])
    return phase, case, find_reference_tissues(case.ct, _centres(case))


def test_truth_enhancement_is_published_iodine_times_scanner(enhanced) -> None:
    phase, case, _ = enhanced
    c = case.truth["contrast"]
    assert case.truth["variants"]["contrast"] is True and case.truth["variants"]["contrast_phase"] == phase
    assert c["phase"] == phase and abs(c["bolus_factor"] - 1.0) <= BOLUS_VARIATION + 1e-9
    k = c["bolus_factor"] * case.truth["scanner"]["iodine_hu_per_mg_ml"] / REFERENCE_IODINE_HU_PER_MG_ML
    for name, hu_120 in PUBLISHED_ENHANCEMENT_HU[phase].items():
        assert c["enhancement_hu"][name] == pytest.approx(hu_120 * k, abs=0.02), name
        assert c["iodine_mg_ml"][name] == pytest.approx(hu_120 / 26.6 * c["bolus_factor"], abs=1e-3), name


def test_painted_vessels_match_the_phase(enhanced) -> None:
    """(a) aorta and IVC as the reference-tissue finder measures them, the portal vein in the tissue map, all within
    noise of the truth; and the ordering the literature gives for the phase."""
    phase, case, tissues = enhanced
    hu = case.truth["contrast"]["hu"]
    assert tissues.median("aorta") == pytest.approx(hu["aorta"], abs=6.0)
    assert tissues.median("ivc") == pytest.approx(hu["ivc"], abs=6.0)
    # the portal vein: blood right of and in front of the spine (clear of the IVC), at L1 and above
    l1 = np.array(case.truth["levels"]["L1"]["centre_lps"])
    k, j, i = np.nonzero(case.tissue == Tissue.BLOOD)
    lps = case.ct.index_to_lps(np.stack([i, j, k], axis=1).astype(float))
    pv = (lps[:, 0] < l1[0] - 38.0) & (lps[:, 1] < l1[1] - 52.0) & (lps[:, 2] > l1[2])
    assert pv.sum() > 20
    assert float(np.median(case.ct.hu[k[pv], j[pv], i[pv]])) == pytest.approx(hu["portal_vein"], abs=10.0)
    if phase == "arterial":
        assert hu["aorta"] > 290 and hu["portal_vein"] < 0.5 * hu["aorta"]
    elif phase == "portal_venous":
        assert 150 <= hu["aorta"] <= 250 and hu["ivc"] > 0.5 * hu["aorta"]
    else:
        assert hu["aorta"] <= 180 and hu["ivc"] >= 0.85 * hu["aorta"]


def test_detector_reads_the_phase(enhanced) -> None:
    """(b) the detector (its published thresholds, not tuned to the phantom) reads the phase painted."""
    phase, case, tissues = enhanced
    p = contrast_phase(tissues, iodine_scale_to_120kvp(case.ct.metadata["kvp"]))
    assert p.phase == phase and p.enhanced is True, p.evidence


def test_spongiosa_enhancement_is_pompe_on_this_scanner(enhanced, unenhanced) -> None:
    """(c) trabecular truth = unenhanced + Pompe 2015 × (scanner iodine / 26.6) × bolus; the image agrees."""
    phase, case, _ = enhanced
    pompe = POMPE_2015_INCREASE_HU["arterial" if phase == "arterial" else "portal_venous"]
    k = case.truth["contrast"]["bolus_factor"] * case.truth["scanner"]["iodine_hu_per_mg_ml"] / 26.6
    for name in ("L1", "L2", "L3", "L4"):
        lv, ref = case.truth["levels"][name], unenhanced.truth["levels"][name]
        assert lv["trabecular_hu_unenhanced"] == ref["trabecular_hu"]
        assert lv["trabecular_enhancement_hu"] == pytest.approx(pompe * k, abs=0.01)
        assert lv["trabecular_hu"] == pytest.approx(ref["trabecular_hu"] + pompe * k, abs=0.02)
    inside = (case.labels == 2) & (case.tissue == Tissue.TRABECULAR)
    diff = case.ct.hu[inside].astype(float).mean() - unenhanced.ct.hu[inside].astype(float).mean()
    assert diff == pytest.approx(pompe * k, abs=1.5)


def _old_mixed(rng: np.random.Generator) -> dict:
    """make_variants("mixed") as it was before the contrast phases (the training cohorts' random stream)."""
    pick = rng.random(8)
    levels = ("L2", "L3", "L4", "L5")
    i = int(rng.integers(0, 3))
    return {"fracture": str(rng.choice(["L1", "L2", "L3"])) if pick[0] < 0.08 else None,
            "implant_levels": (levels[i], levels[i + 1]) if pick[1] < 0.05 else (),
            "contrast": bool(pick[2] < 0.35), "calcification": bool(pick[3] < 0.3), "scoliosis": bool(pick[4] < 0.1),
            "six_lumbar": bool(pick[5] < 0.04),
            "missing_level": ("L1" if pick[7] < 0.5 else "L4") if pick[6] < 0.04 else None,
            "low_dose": bool(rng.random() < 0.1)}


def test_unenhanced_unchanged(unenhanced) -> None:
    """(d) the mixed variant draws the same stream as before; an unenhanced case has no contrast truth and its
    anatomy is its contrast twin's (the bolus draw has its own stream)."""
    phases = set()
    for seed in range(300):
        old_rng, new_rng = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 1])
        old, new = _old_mixed(old_rng), make_variants("mixed", new_rng)
        assert {k: getattr(new, k) for k in old} == old, seed
        assert old_rng.random() == new_rng.random()  # the stream continues where it did
        phases.add(new.contrast_phase)
    assert phases == {None, "arterial", "portal_venous", "delayed"}
    assert make_variants("contrast", np.random.default_rng(0)).contrast_phase == "portal_venous"
    assert CONTRAST_VARIANTS["contrast"] == "portal_venous"
    assert Variants(contrast=True).contrast_phase == "portal_venous" and Variants().contrast is False
    with pytest.raises(ValueError, match="contrast phase"):
        Variants(contrast_phase="venous")
    flags = unenhanced.truth["variants"]
    assert flags["contrast"] is False and flags["contrast_phase"] is None and "contrast" not in unenhanced.truth
    assert "trabecular_hu_unenhanced" not in unenhanced.truth["levels"]["L1"]
    twin = generate_case(SEED, "A", "small", "contrast-delayed")
    np.testing.assert_array_equal(twin.labels, unenhanced.labels)
    changed = twin.tissue != unenhanced.tissue  # only the liver hilum and portal vein are drawn in addition
    assert np.isin(twin.tissue[changed], [Tissue.BLOOD, Tissue.ORGAN]).all()
    assert twin.truth["bmd_mg_cm3"] == unenhanced.truth["bmd_mg_cm3"]
