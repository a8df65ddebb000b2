"""Units of the level identification and its neighbours: the disc valleys and their dynamic programme, damaged
slices, oblique grids, the network's rows, the network's segments renumbered by the anatomy, edited labels, the
training's domain randomisation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from LumbarBMDLib.annotation import prepare
from LumbarBMDLib.localisation import level_centres
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.sagittal import ANNOTATION_SLICES, sagittal_label_image, window_to_unit
from LumbarBMDLib.seg_training import domain_randomisation
from LumbarBMDLib.segmentation import ROW_MULTIPLE, window_rows
from LumbarBMDLib.spine.chain import choose_discs, valley_depth
from LumbarBMDLib.spine.labelling import anatomical_labels, edited_levels
from LumbarBMDLib.volume import CTVolume, axial_grid, damaged_slices, repair_damaged_slices


def _column_profile(pitch=33, disc=10, n=260, dense=True, seed=0):
    """A synthetic column profile (HU per mm): bodies with bright endplates, discs between them."""
    rng = np.random.default_rng(seed)
    p = np.full(n, 180.0 if dense else 55.0)
    discs = list(range(20, n - 10, pitch))
    for d in discs:
        p[d - disc // 2 : d + disc // 2] = 90.0  # the disc
        p[d - disc // 2 - 3 : d - disc // 2] = 320.0  # the endplates on either side
        p[d + disc // 2 : d + disc // 2 + 3] = 320.0
    p[discs[2] + 14] -= 60.0  # a basivertebral vein inside a body: a shallow dip
    return p + rng.normal(0.0, 5.0, n), discs


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "osteoporotic"])
def test_discs_are_the_valleys_between_close_endplates_whatever_the_density(dense):
    profile, truth = _column_profile(dense=dense)
    valley = valley_depth(profile, 8)
    picks = choose_discs(np.clip(valley / np.percentile(valley, 97), 0.0, 1.5))
    assert len(picks) == len(truth)
    assert np.all(np.abs(np.array(picks) - np.array(truth)) <= 3)  # the vein inside the body is no disc


def test_damaged_slices_are_found_and_replaced():
    rng = np.random.default_rng(1)
    z = np.arange(40)[:, None, None]
    hu = (40.0 + 2.0 * z + rng.normal(0, 10, (40, 64, 64))).astype(np.float32)
    vol = CTVolume(hu=hu, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0))
    assert len(damaged_slices(vol)) == 0 and repair_damaged_slices(vol) is vol
    bad = hu.copy()
    bad[12] = rng.uniform(-1000, 1000, bad[12].shape)
    bad[30] = -1024.0
    fixed = repair_damaged_slices(CTVolume(hu=bad, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)))
    assert fixed.metadata["damaged_slices_z_mm"] == [24.0, 60.0]
    assert np.abs(fixed.hu[12] - hu[12]).mean() < 15.0 and np.abs(fixed.hu[30] - hu[30]).mean() < 15.0
    assert "damaged slice" in fixed.metadata["warnings"][-1]


def test_an_oblique_grid_is_resampled_axial_and_keeps_every_lps_value():
    rng = np.random.default_rng(2)
    hu = rng.normal(0, 100, (30, 40, 40)).astype(np.float32)
    a = np.deg2rad(25.0)
    direction = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    vol = CTVolume(hu=hu, spacing=(1.0, 1.0, 1.5), origin=(10.0, -20.0, 5.0), direction=direction)
    ax = axial_grid(vol)
    assert np.allclose(ax.direction, np.eye(3)) and ax.metadata["resampled_axial"]
    ijk = np.array([20.0, 20.0, 15.0])
    lps = vol.index_to_lps(ijk)
    back = np.rint(ax.lps_to_index(lps)).astype(int)
    assert abs(ax.hu[back[2], back[1], back[0]] - hu[15, 20, 20]) < 150.0  # linear interpolation of noise
    straight = CTVolume(hu=hu, spacing=(1.0, 1.0, 1.5), origin=(0.0, 0.0, 0.0))
    assert axial_grid(straight) is straight


@pytest.mark.parametrize(("rows", "size"), [((100, 301), 512), ((0, 7), 512), ((500, 512), 512), (None, 512)])
def test_network_rows_are_a_multiple_of_16_inside_the_image(rows, size):
    r0, r1 = window_rows(rows, size)
    assert 0 <= r0 < r1 <= size and (r1 - r0) % ROW_MULTIPLE == 0
    if rows is not None:
        assert (r0 <= max(rows[0], 0) and r1 >= min(rows[1], size)) or r1 - r0 >= rows[1] - rows[0]


# ---------------------------------------------------------------------------------------------------------------
# the network's segments renumbered by the anatomy
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def case_and_plane():
    case = generate_case(97_200, "A", "small")
    ann = prepare(case.ct)
    geom = ann.images.annotation_geometry
    labels = CTVolume(hu=case.labels, spacing=case.ct.spacing, origin=case.ct.origin)
    levels = (1, 2, 3, 4, 5, 12, 20)
    truth = sagittal_label_image(labels, geom.slab(ANNOTATION_SLICES), levels)
    return case, ann, truth


def _fused(classes: np.ndarray) -> np.ndarray:
    """Fused probabilities that say class ``classes[r, c]`` (0–4) with probability 0.9."""
    fused = np.full((5, *classes.shape), 0.025, np.float32)
    for value in range(5):
        fused[value][classes == value] = 0.9
    return fused / fused.sum(axis=0, keepdims=True)


def test_segments_are_numbered_by_the_body_they_lie_on(case_and_plane):
    _, ann, truth = case_and_plane
    # a network one level off: it calls T12 "L1", L1 "L2", L2 "L3", L3 "L4", and also marks a blob in the canal
    network = np.zeros_like(truth)
    for said, really in ((1, 12), (2, 1), (3, 2), (4, 3)):
        network[truth == really] = said
    # a blob of 150+ mm² in the canal, 3 mm behind its centre line (posterior = +y in LPS), clear of the bodies
    centre = np.asarray(ann.canal.centres_lps[len(ann.canal.centres_lps) // 2]) + np.array([0.0, 3.0, 0.0])
    canal = ann.images.annotation_geometry.lps_to_pixel(centre)
    rr, cc = np.ogrid[:512, :512]
    network[(rr - canal[1]) ** 2 + (cc - canal[0]) ** 2 < 10**2] = 3
    out = anatomical_labels(_fused(network), ann.images.annotation_geometry, ann.spine, ann.images.annotation_hu)
    for value, lv in enumerate(out.levels[:3], start=1):  # L1–L3 by the anatomy, whatever the network said
        assert lv.found and lv.source == "network"
        assert (truth[out.labels == value] == value).mean() > 0.9
        assert lv.network_level == f"L{value + 1}"
    # L4 (which the network left empty) is outlined from the anatomy, on L4's body
    l4 = out.levels[3]
    assert l4.found and l4.source == "classical outline"
    assert (truth[out.labels == 4] == 4).mean() > 0.6
    assert any("T12: dropped" in d for d in out.dropped) and any("canal" in d for d in out.dropped)


def test_edited_labels_on_one_vertebra_are_refused_and_a_wrong_name_is_flagged(case_and_plane):
    _, ann, truth = case_and_plane
    geom = ann.images.annotation_geometry
    edited = np.zeros_like(truth)
    edited[truth == 1] = 1
    top_l3 = (truth == 3) & (np.arange(512)[:, None] < np.median(np.nonzero(truth == 3)[0]))
    edited[top_l3] = 3  # L3 drawn on the upper half of L3 ...
    edited[(truth == 3) & ~top_l3] = 4  # ... and L4 on its lower half
    edited[truth == 2] = 2
    centres = level_centres(edited, geom)
    checked, flags = edited_levels(edited, geom, ann.spine, centres)
    by_level = {c.level: c for c in checked}
    assert not by_level["L3"].found and not by_level["L4"].found
    assert "L3 and L4 are drawn on the same vertebra" in by_level["L3"].reason
    assert by_level["L1"].found and by_level["L2"].found and not flags
    # L2 drawn on L1's body is measured as drawn, and flagged
    swapped = np.zeros_like(truth)
    swapped[truth == 1] = 2
    checked, flags = edited_levels(swapped, geom, ann.spine, level_centres(swapped, geom))
    assert next(c for c in checked if c.level == "L2").found
    assert [f.code for f in flags] == ["edited_label_disagrees"] and "anatomy numbers L1" in flags[0].message


def test_domain_randomisation_keeps_the_vertebrae_and_is_seeded():
    case = generate_case(12_345, "A", "small")
    image, labels = window_to_unit(case.annotation_image), case.annotation_labels
    a = domain_randomisation(image, labels, np.random.default_rng(3), 1.0)
    b = domain_randomisation(image, labels, np.random.default_rng(3), 1.0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == image.shape and a.dtype == np.float32 and 0.0 <= a.min() and a.max() <= 1.0
    vertebrae = labels > 0
    assert np.abs(a[vertebrae] - image[vertebrae]).mean() < 0.05  # only kernel and field touch the bodies
    # the patient's other tissue (not air, which is windowed to 0, nor the 3-pixel rim the randomisation spares)
    # changes more than the vertebrae: that is where the distractors go
    other = ~ndimage.binary_dilation(vertebrae, iterations=3) & (image > 0.02)
    assert np.abs(a[other] - image[other]).mean() > 1.5 * np.abs(a[vertebrae] - image[vertebrae]).mean()
    np.testing.assert_array_equal(domain_randomisation(image, labels, np.random.default_rng(3), 0.0), image)
