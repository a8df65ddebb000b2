"""Tests of the segmentation post-processing (LumbarBMDLib.segmentation_post) on synthetic probability maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from LumbarBMDLib.sagittal import SagittalGeometry
from LumbarBMDLib.segmentation_post import (
    REASON_ABSENT,
    REASON_ORDER,
    REASON_TOO_SMALL,
    SegmentationResult,
    fuse_probabilities,
    label_image_to_sitk,
    postprocess,
)

SIZE = 128
GEOMETRY = SagittalGeometry(origin_lps=(0.0, 0.0, 0.0), n_slices=1, sagittal_x_lps=0.0, size=SIZE)
# Four vertebral bodies, 20 rows × 30 columns each (600 px = 384 mm² at 0.8 mm), top to bottom L1..L4.
# Rectangle (row0, row1, col0, col1), inclusive bounds → centre ((col0 + col1) / 2, (row0 + row1) / 2).
BLOBS = {1: (10, 29, 40, 69), 2: (38, 57, 40, 69), 3: (66, 85, 40, 69), 4: (94, 113, 40, 69)}
STRENGTH = 4.0
# Softmax of a one-hot logit STRENGTH over 5 classes: the winning class's probability.
P_WIN = math.exp(STRENGTH) / (math.exp(STRENGTH) + 4.0)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def label_image(blobs: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    labels = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for value, (r0, r1, c0, c1) in blobs.items():
        labels[r0 : r1 + 1, c0 : c1 + 1] = value
    return labels


def logits_from_labels(labels: np.ndarray, strength: float = STRENGTH) -> np.ndarray:
    """(5, rows, cols) logits: ``strength`` for each pixel's class, 0 for the others."""
    return strength * (np.arange(5)[:, None, None] == labels[None]).astype(np.float64)


def probs_from_labels(labels: np.ndarray, strength: float = STRENGTH, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    logits = logits_from_labels(labels, strength)
    if noise:
        logits = logits + np.random.default_rng(seed).normal(0.0, noise, logits.shape)
    return softmax(logits).astype(np.float32)


def centre(blob: tuple[int, int, int, int]) -> tuple[float, float]:
    r0, r1, c0, c1 = blob
    return ((c0 + c1) / 2.0, (r0 + r1) / 2.0)


def test_four_blobs_in_order():
    truth = label_image(BLOBS)
    fused = probs_from_labels(truth)
    result = postprocess(fused, GEOMETRY)
    assert isinstance(result, SegmentationResult)
    assert result.status == "ok" and result.missing == []
    assert result.labels.dtype == np.uint8 and result.labels.shape == (SIZE, SIZE)
    assert result.probabilities.dtype == np.float32 and result.probabilities.shape == (5, SIZE, SIZE)
    np.testing.assert_array_equal(result.labels, truth)
    assert result.geometry == GEOMETRY
    assert [s.level for s in result.levels] == ["L1", "L2", "L3", "L4"]
    for seg, (value, blob) in zip(result.levels, BLOBS.items(), strict=True):
        assert seg.found and seg.label == value and seg.reason == "" and seg.relabelled_from is None
        assert seg.pixel_count == 600
        assert seg.area_mm2 == pytest.approx(600 * 0.64)
        col, row = centre(blob)
        assert seg.centre_pixel == pytest.approx((col, row))
        np.testing.assert_allclose(seg.centre_lps, GEOMETRY.pixel_to_lps([col, row, 0.0]))
        # By hand: origin 0, columns → +y (posterior), rows → −z (inferior), 0.8 mm pixels.
        np.testing.assert_allclose(seg.centre_lps, [0.0, 0.8 * col, -0.8 * row], atol=1e-9)
        assert seg.confidence == pytest.approx(P_WIN, rel=1e-5)
        assert 0.0 < seg.confidence <= 1.0
    rows = [s.centre_pixel[1] for s in result.levels]
    assert rows == sorted(rows)


def test_spurious_components_removed_keeping_largest_probability_mass():
    truth = label_image(BLOBS)
    labels = truth.copy()
    labels[100:105, 5:10] = 2  # small spurious L2 far from L2 (25 px)
    logits = logits_from_labels(labels)
    # A second, *larger* L2 region (18 × 40 = 720 px) with weak probability: mass 720 · 0.405 ≈ 292 is less
    # than that of the true L2 (600 · 0.93 ≈ 558), so it is dropped even though it has more pixels.
    logits[:, 70:88, 80:120] = 0.0
    logits[2, 70:88, 80:120] = 1.0
    result = postprocess(softmax(logits).astype(np.float32), GEOMETRY)
    assert result.status == "ok"
    np.testing.assert_array_equal(result.labels, truth)  # removed components became 0
    assert result.level("L2").pixel_count == 600
    assert result.level("L2").centre_pixel == pytest.approx(centre(BLOBS[2]))


def test_missing_level_is_flagged_not_invented():
    blobs = {k: v for k, v in BLOBS.items() if k != 4}
    result = postprocess(probs_from_labels(label_image(blobs)), GEOMETRY)
    assert result.status == "partial"
    assert result.missing == ["L4"]
    assert not np.any(result.labels == 4)
    l4 = result.level("L4")
    assert not l4.found and l4.reason == REASON_ABSENT
    assert (l4.centre_pixel, l4.centre_lps, l4.pixel_count, l4.area_mm2) == (None, None, 0, 0.0)
    assert all(result.level(n).found for n in ("L1", "L2", "L3"))


def test_too_small_component_is_missing():
    blobs = dict(BLOBS)
    blobs[4] = (94, 103, 40, 49)  # 10 × 10 px = 64 mm² < 150 mm²
    result = postprocess(probs_from_labels(label_image(blobs)), GEOMETRY)
    assert result.missing == ["L4"]
    assert result.level("L4").reason.startswith(REASON_TOO_SMALL)
    assert not np.any(result.labels == 4)


def test_min_area_boundary_and_pixel_size():
    blobs = dict(BLOBS)
    blobs[4] = (94, 103, 40, 54)  # 10 × 15 = 150 px
    fused = probs_from_labels(label_image(blobs))
    # With 1 mm pixels the area is exactly 150 mm²: not smaller than the minimum, so kept.
    kept = postprocess(fused, GEOMETRY, pixel_mm=1.0, min_area_mm2=150.0)
    assert kept.status == "ok" and kept.level("L4").area_mm2 == 150.0
    # With the geometry's 0.8 mm pixels it is 96 mm²: removed.
    assert postprocess(fused, GEOMETRY).missing == ["L4"]


def test_swapped_order_supported_by_probabilities_is_relabelled():
    # The network labels the top body L2 and the one below L1, but gives the other level a good share:
    # top body logits L2 = 4, L1 = 3.5; second body L1 = 4, L2 = 3.5 → the new level's probability is
    # e^3.5 / (e^4 + e^3.5 + 3) ≈ 0.365 ≥ 0.25, so the rule sorts the bodies by row and swaps the labels.
    truth = label_image(BLOBS)
    swapped = truth.copy()
    swapped[truth == 1], swapped[truth == 2] = 2, 1
    logits = logits_from_labels(swapped)
    logits[1][swapped == 2] = 3.5
    logits[2][swapped == 1] = 3.5
    result = postprocess(softmax(logits).astype(np.float32), GEOMETRY)
    assert result.status == "ok"
    np.testing.assert_array_equal(result.labels, truth)
    p_new = math.exp(3.5) / (math.exp(4.0) + math.exp(3.5) + 3.0)
    for name, original in (("L1", 2), ("L2", 1)):
        seg = result.level(name)
        assert seg.relabelled_from == original
        assert seg.confidence == pytest.approx(p_new, rel=1e-5)
    assert result.level("L1").centre_pixel == pytest.approx(centre(BLOBS[1]))
    assert result.level("L3").relabelled_from is None


def test_swapped_order_without_support_marks_both_levels_missing():
    # Confident but wrong: top body L2, second L1, with ≈ 0.017 probability for the other level.
    truth = label_image(BLOBS)
    swapped = truth.copy()
    swapped[truth == 1], swapped[truth == 2] = 2, 1
    result = postprocess(probs_from_labels(swapped), GEOMETRY)
    assert result.status == "partial"
    assert result.missing == ["L1", "L2"]
    for name in ("L1", "L2"):
        assert result.level(name).reason.startswith(REASON_ORDER)
    assert set(np.unique(result.labels)) == {0, 3, 4}
    np.testing.assert_array_equal(result.labels[truth >= 3], truth[truth >= 3])


def test_single_out_of_order_level_is_the_only_one_missing():
    # Top → bottom the network says L4, L1, L2, L3 with no support for the shift: the largest consistent
    # subset {L1, L2, L3} is unique, so only L4 is missing and the others keep their labels.
    truth = label_image(BLOBS)
    shifted = np.select([truth == 1, truth == 2, truth == 3, truth == 4], [4, 1, 2, 3], 0).astype(np.uint8)
    result = postprocess(probs_from_labels(shifted), GEOMETRY)
    assert result.missing == ["L4"]
    assert result.level("L4").reason.startswith(REASON_ORDER)
    np.testing.assert_array_equal(result.labels, np.where(shifted == 4, 0, shifted))
    # L3, L4, L1, L2: two disjoint consistent pairs, nothing common → all four missing, nothing labelled.
    halves = np.select([truth == 1, truth == 2, truth == 3, truth == 4], [3, 4, 1, 2], 0).astype(np.uint8)
    result = postprocess(probs_from_labels(halves), GEOMETRY)
    assert result.missing == ["L1", "L2", "L3", "L4"] and result.status == "partial"
    assert not result.labels.any()


def test_fusion_is_the_mean_of_the_candidates():
    rng = np.random.default_rng(7)
    # (N=3, 5, 16, 16), each candidate sums to 1 over the classes.
    probs = np.moveaxis(softmax(rng.normal(0, 2, (5, 3, 16, 16))), 0, 1).astype(np.float32)
    fused = fuse_probabilities(probs)
    assert fused.shape == (5, 16, 16) and fused.dtype == np.float32
    np.testing.assert_allclose(fused, probs.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(fused.sum(axis=0), 1.0, atol=1e-5)
    # By hand at one pixel: two candidates (0.2, 0.8, 0, 0, 0) and (0.6, 0.4, 0, 0, 0) → (0.4, 0.6, 0, 0, 0).
    two = np.zeros((2, 5, 1, 1), dtype=np.float32)
    two[0, :2, 0, 0] = (0.2, 0.8)
    two[1, :2, 0, 0] = (0.6, 0.4)
    np.testing.assert_allclose(fuse_probabilities(two)[:, 0, 0], [0.4, 0.6, 0.0, 0.0, 0.0], atol=1e-7)
    with pytest.raises(ValueError, match="softmax"):
        fuse_probabilities(rng.normal(0, 2, (2, 5, 4, 4)))  # logits
    with pytest.raises(ValueError):
        fuse_probabilities(np.ones((5, 4, 4)) / 5)  # no candidate axis


def test_fused_candidates_with_a_bad_slice_still_segment():
    # Ten candidates; two of them miss L3 entirely (background there); the mean still has L3 as argmax.
    truth = label_image(BLOBS)
    good = probs_from_labels(truth)
    bad = probs_from_labels(np.where(truth == 3, 0, truth).astype(np.uint8))
    result = postprocess(fuse_probabilities(np.stack([good] * 8 + [bad] * 2)), GEOMETRY)
    assert result.status == "ok"
    np.testing.assert_array_equal(result.labels, truth)
    assert result.level("L3").confidence < result.level("L2").confidence


def test_confidence_lower_for_a_noisier_map():
    truth = label_image(BLOBS)
    clean = postprocess(probs_from_labels(truth), GEOMETRY)
    noisy = postprocess(probs_from_labels(truth, noise=1.5, seed=1), GEOMETRY)
    assert noisy.status == "ok"  # background specks of each level are removed, the bodies kept
    for name in ("L1", "L2", "L3", "L4"):
        c, n = clean.level(name), noisy.level(name)
        assert 0.0 < n.confidence < c.confidence <= 1.0
        assert n.centre_pixel == pytest.approx(c.centre_pixel, abs=1.0)
    assert set(np.unique(noisy.labels)) == {0, 1, 2, 3, 4}
    for value in (1, 2, 3, 4):  # the noise made hundreds of specks of each level; one component is left
        assert ndimage.label(noisy.probabilities.argmax(axis=0) == value)[1] > 10
        assert ndimage.label(noisy.labels == value, structure=np.ones((3, 3)))[1] == 1


def test_label_image_overlays_on_its_geometry():
    geometry = SagittalGeometry(origin_lps=(12.0, -80.0, 40.0), n_slices=1, sagittal_x_lps=12.0, size=SIZE)
    result = postprocess(probs_from_labels(label_image(BLOBS)), geometry)
    img = label_image_to_sitk(result)
    assert img.GetSize() == (SIZE, SIZE, 1)
    assert img.GetOrigin() == pytest.approx(geometry.origin_lps)
    assert img.GetSpacing() == pytest.approx(geometry.spacing)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img)[0], result.labels)
    for seg in result.levels:
        col, row = seg.centre_pixel
        np.testing.assert_allclose(img.TransformContinuousIndexToPhysicalPoint((col, row, 0.0)), seg.centre_lps)


def test_multislice_geometry_uses_its_central_plane_and_shape_is_checked():
    stack = SagittalGeometry(origin_lps=(4.0, 0.0, 0.0), n_slices=10, sagittal_x_lps=0.4, size=SIZE)
    result = postprocess(probs_from_labels(label_image(BLOBS)), stack)
    assert result.geometry == stack.central_plane()
    assert result.level("L1").centre_lps[0] == pytest.approx(0.4)  # x of the central plane: 4 − 4.5 · 0.8
    with pytest.raises(ValueError, match="shape"):
        postprocess(np.full((5, 64, 64), 0.2, dtype=np.float32), GEOMETRY)
