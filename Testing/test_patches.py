"""Localisation and trabecular patches: geometry on phantom truth, the spacing policy, bad cases."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from LumbarBMDLib.localisation import (
    REASON_FRAGMENT,
    REASON_NOT_LABELLED,
    REASON_OUTSIDE_CT,
    LevelLocation,
    level_centres,
    level_centres_in_image,
    locate_in_ct,
)
from LumbarBMDLib.patches import (
    PATCH_PIXEL_MM,
    PATCH_SIZE,
    REASON_METAL,
    REASON_NO_WINDOW,
    sample_axial_planes,
    trabecular_patch,
    trabecular_patches,
    window_to_patch_unit,
)
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.sagittal import SagittalGeometry
from LumbarBMDLib.volume import CTVolume

LEVELS = ("L1", "L2", "L3", "L4")


def truth_locations(case) -> list[LevelLocation]:
    """The phantom's true level centres as located levels."""
    locs = [LevelLocation(lv, True, "", np.array(case.truth["levels"][lv]["centre_lps"])) for lv in LEVELS]
    return locate_in_ct(locs, case.ct)


def labels_around_window(case, patch, margin_mm: float) -> np.ndarray:
    """Truth labels (nearest voxel) at every window pixel of the 3 channels, shifted by ±margin in x, y and z."""
    half = PATCH_SIZE // 2
    _, lps = sample_axial_planes(case.ct, patch.centre_lps, half, half)
    lps = lps[:, :PATCH_SIZE, :PATCH_SIZE]  # the window: centre pixel at index 16 of 32
    out = []
    for shift in [(0, 0, 0), *[tuple(margin_mm * s * np.eye(3)[a]) for a in range(3) for s in (-1, 1)]]:
        ijk = np.rint(case.ct.lps_to_index(lps + np.array(shift))).astype(int)
        ijk = np.clip(ijk, 0, np.array(case.labels.shape[::-1]) - 1)
        out.append(case.labels[ijk[..., 2], ijk[..., 1], ijk[..., 0]])
    return np.stack(out)


@pytest.mark.parametrize("vendor", ["A", "C"])
def test_window_inside_body_and_clear_of_cortex_on_phantom_truth(full_normal_case, small_case, vendor):
    cases = [full_normal_case, small_case] if vendor == "A" else [generate_case(12, "C", "small")]
    for case in cases:
        patches = trabecular_patches(case.ct, truth_locations(case))
        for value, patch in enumerate(patches, start=1):
            assert patch.found, (case.case_id, patch.level, patch.reason)
            assert patch.image.shape == (3, PATCH_SIZE, PATCH_SIZE) and patch.image.dtype == np.float32
            # every pixel of the three channels, and every point 0.5 mm around it, is this level's body: the window
            # lies inside the body and keeps clear of its 0.5 mm cortical shell
            around = labels_around_window(case, patch, margin_mm=0.5)
            assert np.all(around == value), (case.case_id, patch.level, np.unique(around))
            truth_hu = case.truth["levels"][patch.level]["trabecular_hu"]
            assert abs(patch.mean_hu - truth_hu) < 8.0, (patch.level, patch.mean_hu, truth_hu)


def test_window_normalisation_is_the_fixed_window():
    hu = np.array([-1000.0, -150.0, 350.0, 850.0, 2000.0], np.float32)
    assert np.allclose(window_to_patch_unit(hu), [0.0, 0.0, 0.5, 1.0, 1.0])


def cylinder_ct(radius_mm: float, spacing: tuple[float, float, float], trabecular_hu: float = 150.0,
                metal: bool = False) -> CTVolume:
    """A vertical bone cylinder (1 mm cortex at 800 HU) in 40 HU soft tissue, centred at LPS (0, 0, 0)."""
    n = (int(120 / spacing[0]), int(120 / spacing[1]), int(60 / spacing[2]))
    origin = tuple(-(k - 1) / 2 * s for k, s in zip(n, spacing, strict=True))
    _, y, x = np.meshgrid(*[o + np.arange(k) * s for o, k, s in zip(origin[::-1], n[::-1], spacing[::-1],
                                                                        strict=True)], indexing="ij")
    r = np.hypot(x, y)
    hu = np.full(r.shape, 40.0, np.float32)
    hu[r <= radius_mm] = 800.0
    hu[r <= radius_mm - 1.0] = trabecular_hu
    if metal:
        hu[(np.abs(x - radius_mm * 0.5) < 3) & (np.abs(y) < 3)] = 3071.0
    return CTVolume(hu=hu, spacing=spacing, origin=origin)


@pytest.mark.parametrize("spacing", [(0.5, 0.5, 0.625), (0.8, 0.8, 1.0), (1.5, 1.5, 3.0)])
def test_spacing_policy_same_physical_window(spacing):
    """32 pixels = 16 mm on every grid: a 16 mm-radius body always holds the window, a 9 mm one never."""
    assert PATCH_SIZE * PATCH_PIXEL_MM == pytest.approx(16.0)
    centre = LevelLocation("L3", True, "", np.zeros(3))
    big = trabecular_patch(cylinder_ct(16.0, spacing), locate_in_ct([centre], cylinder_ct(16.0, spacing))[0])
    assert big.found and abs(big.mean_hu - 150.0) < 3.0
    assert np.allclose(big.centre_lps[:2], 0.0, atol=1.0)
    small_ct = cylinder_ct(9.0, spacing)
    small = trabecular_patch(small_ct, locate_in_ct([centre], small_ct)[0])
    assert not small.found and small.reason == REASON_NO_WINDOW and small.image is None


def test_osteoporotic_body_at_muscle_density_is_found():
    """Spongiosa at 45 HU next to 40 HU soft tissue: the cortex, not a fixed threshold, bounds the body."""
    ct = cylinder_ct(16.0, (0.8, 0.8, 1.0), trabecular_hu=45.0)
    patch = trabecular_patch(ct, locate_in_ct([LevelLocation("L1", True, "", np.zeros(3))], ct)[0])
    assert patch.found and abs(patch.mean_hu - 45.0) < 3.0


def test_metal_and_missing_levels_have_reasons():
    ct = cylinder_ct(16.0, (0.8, 0.8, 1.0), metal=True)
    patch = trabecular_patch(ct, locate_in_ct([LevelLocation("L2", True, "", np.zeros(3))], ct)[0])
    assert not patch.found and patch.reason == REASON_METAL
    missing = trabecular_patch(ct, LevelLocation("L4", False, REASON_NOT_LABELLED))
    assert not missing.found and missing.reason == REASON_NOT_LABELLED
    outside = locate_in_ct([LevelLocation("L1", True, "", np.array([0.0, 0.0, 500.0]))], ct)[0]
    assert not outside.found and outside.reason == REASON_OUTSIDE_CT


def test_implant_variant_levels_are_not_measured():
    case = generate_case(601, "B", "small", "implant")
    implanted = set(case.truth["variants"]["implant_levels"])
    assert implanted
    for patch in trabecular_patches(case.ct, truth_locations(case)):
        if patch.level in implanted:
            assert not patch.found and patch.reason == REASON_METAL


def test_level_centres_on_a_sagittal_label_image():
    geom = SagittalGeometry(origin_lps=(5.0, -100.0, 200.0), n_slices=1, sagittal_x_lps=5.0)
    labels = np.zeros((512, 512), np.uint8)
    labels[100:140, 200:240] = 1  # L1: centre (column 219.5, row 119.5)
    labels[160:200, 200:240] = 2
    labels[300:305, 200:205] = 3  # a 25-pixel fragment (16 mm²)
    labels[10:12, 10:12] = 2  # a stray bit of L2: the largest component wins
    locs = level_centres(labels, geom)
    assert [loc.level for loc in locs] == list(LEVELS)
    assert locs[0].found and np.allclose(locs[0].centre_lps, geom.pixel_to_lps([219.5, 119.5, 0.0]))
    assert locs[0].area_mm2 == pytest.approx(40 * 40 * 0.64)
    assert locs[1].found and np.allclose(locs[1].centre_lps, geom.pixel_to_lps([219.5, 179.5, 0.0]))
    assert not locs[2].found and locs[2].reason.startswith(REASON_FRAGMENT)
    assert not locs[3].found and locs[3].reason == REASON_NOT_LABELLED
    # the same image written as NIfTI gives the same centres through its own geometry
    img = geom.to_sitk(labels)
    again = level_centres_in_image(img)
    assert np.allclose(again[0].centre_lps, locs[0].centre_lps) and again[1].found and not again[2].found


def test_level_centres_in_3d_truth_match_the_phantom(small_case):
    img = sitk.GetImageFromArray(small_case.labels)
    img.SetSpacing(small_case.ct.spacing)
    img.SetOrigin(small_case.ct.origin)
    for loc in level_centres_in_image(img):
        truth = np.array(small_case.truth["levels"][loc.level]["centre_lps"])
        assert loc.found and np.linalg.norm(loc.centre_lps - truth) < 3.0, (loc.level, loc.centre_lps, truth)
