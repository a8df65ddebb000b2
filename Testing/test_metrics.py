"""Tests of the segmentation metrics (LumbarBMDLib.metrics): hand-checked counts, 0/0 conventions, validity, summary."""

from __future__ import annotations

import math

import numpy as np
import pytest

from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.metrics import LEVEL_NAMES, is_valid_case, segmentation_metrics, summarise

# Hand-checked example (4 × 4). Pixel (r, c):
#   L1: pred {(0,0),(0,1),(1,0)}, truth {(0,0),(0,1),(0,2)} → TP 2, FP 1 (1,0), FN 1 (0,2)
#       DSC 4/6, PPV 2/3, sensitivity 2/3
#   L2: pred {(1,1),(1,2)}, truth {(1,1),(1,2),(1,3)}        → TP 2, FP 0, FN 1 (1,3)
#       DSC 4/5, PPV 2/2, sensitivity 2/3
#   L3: pred {(2,0),(2,1)}, truth {(2,0)}                    → TP 1, FP 1 (2,1), FN 0
#       DSC 2/3, PPV 1/2, sensitivity 1/1
#   L4: pred {}, truth {(3,2),(3,3)}                         → TP 0, FP 0, FN 2
#       DSC 0/2 = 0, PPV 0/0 → 0 (convention: present in truth, not predicted), sensitivity 0/2 = 0
PRED = np.array(
    [
        [1, 1, 0, 0],
        [1, 2, 2, 0],
        [3, 3, 0, 0],
        [0, 0, 0, 0],
    ]
)
TRUTH = np.array(
    [
        [1, 1, 1, 0],
        [0, 2, 2, 2],
        [3, 0, 0, 0],
        [0, 0, 4, 4],
    ]
)
EXPECTED = {
    "L1": {"tp": 2, "fp": 1, "fn": 1, "dsc": 4 / 6, "ppv": 2 / 3, "sensitivity": 2 / 3},
    "L2": {"tp": 2, "fp": 0, "fn": 1, "dsc": 4 / 5, "ppv": 1.0, "sensitivity": 2 / 3},
    "L3": {"tp": 1, "fp": 1, "fn": 0, "dsc": 2 / 3, "ppv": 1 / 2, "sensitivity": 1.0},
    "L4": {"tp": 0, "fp": 0, "fn": 2, "dsc": 0.0, "ppv": 0.0, "sensitivity": 0.0},
}


def test_hand_checked_example_exact_values():
    m = segmentation_metrics(PRED, TRUTH)
    assert list(m) == ["L1", "L2", "L3", "L4"]
    for name, expected in EXPECTED.items():
        for key, value in expected.items():
            assert m[name][key] == value, (name, key)
        assert m[name]["both_absent"] is False


def test_metrics_are_symmetric_in_the_right_way():
    # Swapping prediction and truth swaps FP and FN, hence PPV and sensitivity; DSC is unchanged.
    m = segmentation_metrics(PRED, TRUTH, levels=(1, 2, 3))
    s = segmentation_metrics(TRUTH, PRED, levels=(1, 2, 3))
    for name in ("L1", "L2", "L3"):
        assert s[name]["dsc"] == m[name]["dsc"]
        assert (s[name]["fp"], s[name]["fn"]) == (m[name]["fn"], m[name]["fp"])
        assert s[name]["ppv"] == m[name]["sensitivity"]
        assert s[name]["sensitivity"] == m[name]["ppv"]


def test_agrees_with_set_formula_on_random_3d_labels():
    rng = np.random.default_rng(3)
    pred = rng.integers(0, 5, size=(6, 7, 8))
    truth = np.where(rng.random(pred.shape) < 0.7, pred, rng.integers(0, 5, size=pred.shape))
    m = segmentation_metrics(pred, truth)
    for level in (1, 2, 3, 4):
        a, b = pred == level, truth == level
        inter = np.sum(a & b)
        assert m[f"L{level}"]["dsc"] == pytest.approx(2 * inter / (a.sum() + b.sum()))
        assert m[f"L{level}"]["ppv"] == pytest.approx(inter / a.sum())
        assert m[f"L{level}"]["sensitivity"] == pytest.approx(inter / b.sum())
        assert m[f"L{level}"]["tp"] + m[f"L{level}"]["fn"] == b.sum()


def test_zero_over_zero_conventions():
    # L1 present in both; L2 absent in both; L3 absent in truth but predicted; L4 present in truth only.
    pred = np.array([[1, 3, 0, 0]])
    truth = np.array([[1, 1, 0, 4]])
    m = segmentation_metrics(pred, truth)
    # Absent in both: TP = FP = FN = 0 → all three metrics 1.0, flagged.
    assert m["L2"] == {"dsc": 1.0, "ppv": 1.0, "sensitivity": 1.0, "tp": 0, "fp": 0, "fn": 0, "both_absent": True}
    # Absent in truth, predicted at (0,1): TP 0, FP 1, FN 0 → DSC 0/1, PPV 0/1, sensitivity 0/0 → 0.
    assert m["L3"] == {"dsc": 0.0, "ppv": 0.0, "sensitivity": 0.0, "tp": 0, "fp": 1, "fn": 0, "both_absent": False}
    # Present in truth at (0,3), not predicted: TP 0, FP 0, FN 1 → DSC 0/1, PPV 0/0 → 0, sensitivity 0/1.
    assert m["L4"] == {"dsc": 0.0, "ppv": 0.0, "sensitivity": 0.0, "tp": 0, "fp": 0, "fn": 1, "both_absent": False}
    # L1: TP 1 (0,0), FP 0, FN 1 (0,1) → DSC 2/3, PPV 1, sensitivity 1/2.
    assert (m["L1"]["dsc"], m["L1"]["ppv"], m["L1"]["sensitivity"]) == (2 / 3, 1.0, 0.5)


def test_shape_mismatch_is_a_user_error():
    with pytest.raises(LumbarBMDError, match="same image grid"):
        segmentation_metrics(np.zeros((4, 4)), np.zeros((4, 5)))


def _case_with_l1_dsc_half() -> tuple[np.ndarray, np.ndarray]:
    """L2–L4 perfect; L1: pred 1 pixel inside a 3-pixel truth → TP 1, FP 0, FN 2, DSC 2/(2+0+2) = 0.5."""
    truth = np.array([[1, 1, 1, 2, 3, 4]])
    pred = np.array([[1, 0, 0, 2, 3, 4]])
    return pred, truth


def test_valid_case_needs_every_dsc_strictly_above_half():
    pred, truth = _case_with_l1_dsc_half()
    m = segmentation_metrics(pred, truth)
    assert m["L1"]["dsc"] == 0.5
    assert not is_valid_case(m)  # 0.5 exactly is not > 0.5
    # Two of three L1 pixels: TP 2, FP 0, FN 1 → DSC 4/5 > 0.5, the rest perfect → valid.
    pred[0, 1] = 1
    assert segmentation_metrics(pred, truth)["L1"]["dsc"] == 0.8
    assert is_valid_case(segmentation_metrics(pred, truth))
    # The hand-checked example: L4 DSC 0 → not valid.
    assert not is_valid_case(segmentation_metrics(PRED, TRUTH))


def test_valid_case_requires_all_four_levels():
    with pytest.raises(ValueError, match="L1–L4"):
        is_valid_case(segmentation_metrics(PRED, TRUTH, levels=(1, 2, 3)))


def test_summarise_mean_sd_and_valid_rate():
    perfect = segmentation_metrics(TRUTH, TRUTH)  # all metrics 1, valid
    example = segmentation_metrics(PRED, TRUTH)  # EXPECTED above, not valid (L4 DSC 0)
    s = summarise([perfect, example])
    assert (s["n_cases"], s["n_valid"], s["valid_rate"]) == (2, 1, 0.5)
    assert list(s["levels"]) == list(LEVEL_NAMES)
    for name in LEVEL_NAMES:
        for metric in ("dsc", "ppv", "sensitivity"):
            x = EXPECTED[name][metric]
            # Mean of {1, x}; sample SD (ddof 1) of two values = |1 − x| / √2.
            assert s["levels"][name][metric]["mean"] == pytest.approx((1 + x) / 2)
            assert s["levels"][name][metric]["sd"] == pytest.approx(abs(1 - x) / math.sqrt(2))


def test_summarise_single_case_and_errors():
    s = summarise([segmentation_metrics(PRED, TRUTH)])
    assert s["levels"]["L2"]["dsc"]["mean"] == 0.8
    assert math.isnan(s["levels"]["L2"]["dsc"]["sd"])
    assert s["valid_rate"] == 0.0
    with pytest.raises(ValueError):
        summarise([])
    with pytest.raises(ValueError):
        summarise([segmentation_metrics(PRED, TRUTH), segmentation_metrics(PRED, TRUTH, levels=(4, 3, 2, 1))])
