"""Every variant on every vendor generates, writes and reads back (small size)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from LumbarBMDLib.phantom import VARIANTS, generate_case, write_case
from LumbarBMDLib.phantom.render import Tissue
from LumbarBMDLib.volume import read_ct

CASES = [(variant, "ABC"[i % 3]) for i, variant in enumerate(VARIANTS)] + [("mixed", "A"), ("mixed", "B")]


@pytest.mark.parametrize(("variant", "vendor"), CASES)
def test_variant_generates_and_round_trips(variant, vendor, tmp_path):
    case = generate_case(300 + VARIANTS.index(variant), vendor, "small", variant)
    flags = case.truth["variants"]
    folder = write_case(case, tmp_path)
    truth = json.loads((folder / "truth.json").read_text(encoding="utf-8"))
    assert truth["variants"] == flags and truth["vendor"] == vendor and truth["size"] == "small"
    ct = read_ct(folder / "ct.nii.gz")
    np.testing.assert_array_equal(ct.hu, case.ct.hu.astype(np.float32))
    np.testing.assert_allclose(ct.affine, case.ct.affine, atol=1e-4)
    # what the variant promises is in the image
    in_view = set(truth["levels_in_view"])
    expected_missing = {"partial-L1": {"L1"}, "partial-L4": {"L4"}}.get(variant, set())
    assert in_view == {"L1", "L2", "L3", "L4"} - expected_missing if variant != "mixed" else in_view
    if variant == "implant":
        assert (case.tissue == Tissue.METAL).any() and case.ct.hu.max() >= 3000
    if variant == "six-lumbar":
        assert (case.labels == 6).any() and "L6" in truth["levels"]
    if variant == "fracture":
        assert truth["levels"][flags["fracture"]]["fracture_wedge"] >= 0.25
    if variant.startswith("contrast"):  # enhanced blood pool (aorta +95 to +300 HU by phase, test_contrast_phases.py)
        assert case.ct.hu[case.tissue == Tissue.BLOOD].mean() > truth["scanner"]["blood_hu"] + 60
    # the annotator's truth draws exactly the levels in view, top to bottom
    drawn = truth["annotation"]["levels_drawn"]
    assert drawn == [lv for lv in ("L1", "L2", "L3", "L4") if lv in in_view]
    rows = [
        np.nonzero(case.annotation_labels == i + 1)[0].mean()
        for i, lv in enumerate(("L1", "L2", "L3", "L4"))
        if lv in drawn
    ]
    assert rows == sorted(rows)
