"""Segmentation metrics per vertebra (DESIGN.md "Method" 8, "Evaluation"): DSC, PPV, sensitivity.

For one level with label value ``v``, a predicted label image ``pred`` and the truth ``truth``:

* TP = pixels (voxels) where both are ``v``; FP = ``pred == v`` but ``truth != v``; FN = ``truth == v``
  but ``pred != v``;
* DSC = 2TP / (2TP + FP + FN), PPV = TP / (TP + FP), sensitivity = TP / (TP + FN) (the paper's definitions).

Conventions for the ratios that are 0/0 (they arise only when the level is absent from the truth, from
the prediction, or from both), chosen so that *agreement about absence scores 1 and any disagreement
about presence scores 0 in all three metrics*:

* absent in truth and in prediction (TP = FP = FN = 0): DSC = PPV = sensitivity = 1.0, and the level
  is flagged ``both_absent``;
* absent in truth but predicted (TP = FN = 0, FP > 0): DSC = PPV = 0.0 (well defined) and
  sensitivity (0/0) = 0.0;
* present in truth but not predicted (TP = FP = 0, FN > 0): DSC = sensitivity = 0.0 (well defined)
  and PPV (0/0) = 0.0.

The ``both_absent`` flag lets a caller exclude such levels (e.g. a scan that stops above L4 and whose
truth has no L4) instead of counting the 1.0s. A case is *valid* (paper) when the DSC of all four levels
is strictly greater than 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from LumbarBMDLib.errors import LumbarBMDError

#: Label values of the evaluated levels and their names (DESIGN.md "Labels").
LEVELS = (1, 2, 3, 4)
LEVEL_NAMES = ("L1", "L2", "L3", "L4")
#: The ratio metrics, in the order they are reported.
METRIC_NAMES = ("dsc", "ppv", "sensitivity")
#: A case is valid when every level's DSC is strictly greater than this (paper).
VALID_DSC = 0.5


def level_name(level: int) -> str:
    """Name of a label value: 1 → "L1"."""
    return f"L{int(level)}"


def _ratio(num: int, den: int, both_absent: bool) -> float:
    """num / den, with 0/0 → 1.0 when the level is absent from both images and 0.0 otherwise."""
    if den == 0:
        return 1.0 if both_absent else 0.0
    return num / den


def segmentation_metrics(
    pred: np.ndarray, truth: np.ndarray, levels: Iterable[int] = LEVELS
) -> dict[str, dict[str, float]]:
    """DSC, PPV and sensitivity of each level, with the counts they come from.

    Args:
        pred: integer label image, any shape (e.g. ``(rows, cols)`` sagittal or ``(z, y, x)``), values
            0 = background and 1–4 = L1–L4 (other values are simply "not this level").
        truth: label image of the same shape and conventions.
        levels: label values to evaluate.

    Returns:
        ``{"L1": {"dsc", "ppv", "sensitivity", "tp", "fp", "fn", "both_absent"}, ...}`` in the order of
        ``levels``; tp/fp/fn are pixel counts (int), ``both_absent`` a bool; the 0/0 conventions are in
        the module docstring.

    Raises:
        LumbarBMDError: if the two images do not have the same shape.
    """
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise LumbarBMDError(
            f"the predicted labels {pred.shape} and the reference labels {truth.shape} are not on the same "
            "image grid, so they cannot be compared"
        )
    out: dict[str, dict[str, float]] = {}
    for level in levels:
        p = pred == level
        t = truth == level
        tp = int(np.count_nonzero(p & t))
        fp = int(np.count_nonzero(p)) - tp
        fn = int(np.count_nonzero(t)) - tp
        both_absent = tp + fp + fn == 0
        out[level_name(level)] = {
            "dsc": _ratio(2 * tp, 2 * tp + fp + fn, both_absent),
            "ppv": _ratio(tp, tp + fp, both_absent),
            "sensitivity": _ratio(tp, tp + fn, both_absent),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "both_absent": both_absent,
        }
    return out


def is_valid_case(metrics: Mapping[str, Mapping[str, float]], threshold: float = VALID_DSC) -> bool:
    """True when the DSC of every one of L1–L4 is strictly greater than ``threshold`` (0.5, paper).

    Args:
        metrics: one case's result of :func:`segmentation_metrics` (must contain L1–L4).

    Raises:
        ValueError: if one of L1–L4 is missing from ``metrics``.
    """
    missing = [name for name in LEVEL_NAMES if name not in metrics]
    if missing:
        raise ValueError(f"metrics lack {missing}: a case's validity needs all four of L1–L4")
    return all(metrics[name]["dsc"] > threshold for name in LEVEL_NAMES)


def _mean_sd(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof = 1; NaN for fewer than two values)."""
    arr = np.asarray(values, dtype=float)
    sd = float(np.std(arr, ddof=1)) if arr.size > 1 else math.nan
    return {"mean": float(np.mean(arr)), "sd": sd}


def summarise(cases: Sequence[Mapping[str, Mapping[str, float]]]) -> dict:
    """Mean and SD of each metric per level over cases, and the valid-case rate.

    Args:
        cases: per-case results of :func:`segmentation_metrics` (all with the same level names; the
            valid-case rule needs L1–L4).

    Returns:
        ``{"n_cases": n, "n_valid": k, "valid_rate": k / n,
        "levels": {"L1": {"dsc": {"mean", "sd"}, "ppv": {...}, "sensitivity": {...}}, ...}}``.
        SD is the sample SD (ddof = 1), NaN when there is a single case. Levels flagged ``both_absent``
        enter the means with their conventional 1.0 (see the module docstring).

    Raises:
        ValueError: if ``cases`` is empty or the cases do not have the same levels.
    """
    if len(cases) == 0:
        raise ValueError("no cases to summarise")
    names = list(cases[0])
    if any(list(c) != names for c in cases):
        raise ValueError("the cases were evaluated on different levels")
    n_valid = sum(is_valid_case(c) for c in cases)
    return {
        "n_cases": len(cases),
        "n_valid": int(n_valid),
        "valid_rate": n_valid / len(cases),
        "levels": {
            name: {metric: _mean_sd([c[name][metric] for c in cases]) for metric in METRIC_NAMES} for name in names
        },
    }


# ---------------------------------------------------------------------------------------------------------------
# canal centres against vertebra masks (real CTs without a canal truth)
# ---------------------------------------------------------------------------------------------------------------
def _first_hit_mm(mask: np.ndarray, centre_ij, centre_deg: float, half_deg: float, max_mm: float,
                  spacing_xy: Sequence[float]) -> float:
    """Distance (mm) to the first pixel of ``mask`` along rays from ``centre_ij`` within ±``half_deg`` of
    ``centre_deg`` (0° = +i, i.e. the patient's left; 90° = +j, posterior), the nearest over the rays; inf if none."""
    best = math.inf
    for a in np.deg2rad(np.arange(centre_deg - half_deg, centre_deg + half_deg + 1e-6, 7.5)):
        for t in np.arange(0.5, max_mm, 0.5):
            i = round(float(centre_ij[0] + np.cos(a) * t / spacing_xy[0]))
            j = round(float(centre_ij[1] + np.sin(a) * t / spacing_xy[1]))
            if not (0 <= j < mask.shape[0] and 0 <= i < mask.shape[1]):
                break
            if mask[j, i]:
                best = min(best, float(t))
                break
    return best


def inside_vertebral_canal(vertebrae: np.ndarray, bodies: np.ndarray, k: int, centre_ij,
                           spacing_xy: Sequence[float]) -> bool:
    """Whether a point lies in the vertebral canal, judged from vertebra masks (for real CTs, which have no canal
    truth; the masks of a 3 mm scan rarely enclose the canal on one slice, so slices k − 1 … k + 1 count).

    Inside means: not in a vertebra or a body/disc; a vertebral body or disc within 15 mm in front (±20°); posterior
    elements within 30 mm behind (±30°); and vertebra on both sides (±30°) at distances within 9 mm of each other.

    Args:
        vertebrae: ``(nz, ny, nx)`` labels of whole vertebrae (> 0), axial LPS (j → posterior).
        bodies: same grid, > 0 on vertebral bodies and discs.
        k: axial slice; centre_ij: the point's (i, j); spacing_xy: pixel size (mm).
    """
    i, j = (round(float(v)) for v in centre_ij[:2])
    if vertebrae[k, j, i] or bodies[k, j, i]:
        return False
    near = slice(max(k - 1, 0), k + 2)
    body = (bodies[near] > 0).any(axis=0)
    posterior = ((vertebrae[near] > 0) & (bodies[near] == 0)).any(axis=0)
    bone = (vertebrae[near] > 0).any(axis=0)
    left = _first_hit_mm(bone, centre_ij, 0.0, 30.0, 20.0, spacing_xy)
    right = _first_hit_mm(bone, centre_ij, 180.0, 30.0, 20.0, spacing_xy)
    return (math.isfinite(_first_hit_mm(body, centre_ij, 270.0, 20.0, 15.0, spacing_xy))
            and math.isfinite(_first_hit_mm(posterior, centre_ij, 90.0, 30.0, 30.0, spacing_xy))
            and abs(left - right) <= 9.0)
