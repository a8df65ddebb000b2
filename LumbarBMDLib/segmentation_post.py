"""Post-processing of the R2U-Net output: fused probabilities → one L1–L4 label image with per-level centres.

The network runner (torch, elsewhere) gives softmax probabilities ``(N, 5, rows, cols)`` for the N = 10
sagittal candidates; this module is pure numpy/scipy:

1. :func:`fuse_probabilities` averages them over the candidates → ``(5, rows, cols)``.
2. :func:`postprocess` turns the fused map into a label image and one :class:`LevelSegment` per level
   (DESIGN.md "Method" 4, localisation):

   * **argmax** over the 5 classes (0 background, 1–4 = L1–L4);
   * **one component per level**: the 8-connected components of each level are found and only the one
     with the largest probability mass (sum of that level's fused probability over its pixels) is kept;
     the pixels of every other component become background (0);
   * **minimum size**: a kept component smaller than ``min_area_mm2`` (150 mm²; a lumbar body in a
     sagittal section covers several hundred mm²) is removed and its level is missing ("not found: too small");
     a level with no pixel at all is missing ("not found: no pixels", e.g. out of view). A missing level
     is never invented from another class's pixels;
   * **cranio-caudal order**: rows run superior → inferior, so the found levels must satisfy
     row(L1) < row(L2) < row(L3) < row(L4) for their centre rows. When they do not, the ordering rule
     below applies;
   * per-level **centre** (unweighted centroid of the component, (column, row) in pixels, and its LPS point
     through the image's :class:`~LumbarBMDLib.sagittal.SagittalGeometry`), **area** and **confidence**
     (mean fused probability of the level over its component, in (0, 1]).

Ordering rule (the paper's limitation "semantic segmentation confuses neighbouring vertebrae"):

a. Sort the found components by centre row (top → bottom) and give them the found label values in
   increasing order (a permutation of the labels that were found; nothing is added or dropped).
b. Accept that relabelling only if the network *supports* it: for every component whose label changes,
   the mean fused probability of its new level over the component is at least ``min_relabel_probability``
   (0.25). The relabelled segment records its original label in ``relabelled_from``, and its confidence
   is the (lower) probability of the new level.
c. Otherwise the labels are kept as the network gave them, and only the levels that every *largest
   order-consistent subset* of the found levels contains are kept (a subset is order-consistent when it
   has no inversion, i.e. no pair a < b with row(a) ≥ row(b)). The others are marked missing with reason
   "not found: out of cranio-caudal order (…)" and their pixels become 0. Examples (labels listed top
   → bottom): L2, L1, L3, L4 → {L1, L3, L4} and {L2, L3, L4} are both largest, so L1 and L2 are missing
   (nothing tells which of the two is right); L4, L1, L2, L3 → only {L1, L2, L3}, so L4 alone is missing;
   L3, L4, L1, L2 → all four missing. Reporting no BMD is safer than reporting one for the wrong
   vertebra; the radiologist can correct the labels and re-run.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from LumbarBMDLib._compat import zip_strict
from LumbarBMDLib.sagittal import SagittalGeometry

#: Output classes of the segmentation network: 0 background, 1–4 = L1–L4.
NUM_CLASSES = 5
LEVELS = (1, 2, 3, 4)
LEVEL_NAMES = ("L1", "L2", "L3", "L4")
MIN_AREA_MM2 = 150.0
MIN_RELABEL_PROBABILITY = 0.25

#: Reasons of a missing level (the too-small and order reasons get details in parentheses appended).
REASON_ABSENT = "not found: no pixels (out of view or not recognised)"
REASON_TOO_SMALL = "not found: too small"
REASON_ORDER = "not found: out of cranio-caudal order"

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass
class LevelSegment:
    """One vertebral level on the fused label image.

    Attributes:
        level: "L1".."L4".
        label: its label value 1..4.
        found: whether the level has a component in :attr:`SegmentationResult.labels`.
        reason: why it is missing ("" when found); starts with one of the ``REASON_*`` constants.
        area_mm2: area of the component (mm²); 0 when missing.
        centre_pixel: centroid ``(column, row)`` of the component in pixels (floats); None when missing.
        centre_lps: float ``(3,)`` LPS point (mm) of the centroid; None when missing.
        confidence: mean fused probability of this level over the component, in (0, 1]; 0 when missing.
        pixel_count: number of pixels of the component; 0 when missing.
        relabelled_from: the label value the network gave this component when the ordering rule
            relabelled it; None otherwise.
    """

    level: str
    label: int
    found: bool
    reason: str = ""
    area_mm2: float = 0.0
    centre_pixel: tuple[float, float] | None = None
    centre_lps: np.ndarray | None = None
    confidence: float = 0.0
    pixel_count: int = 0
    relabelled_from: int | None = None


@dataclass
class SegmentationResult:
    """The post-processed segmentation of one case.

    Attributes:
        labels: uint8 ``(rows, cols)`` label image, values 0 (background) and 1–4 (L1–L4), one component
            per found level.
        probabilities: float32 ``(5, rows, cols)`` fused softmax probabilities the labels came from.
        levels: the four :class:`LevelSegment` in the order L1, L2, L3, L4.
        geometry: single-slice grid of the label image (``labels`` ↔ slice 0), so
            :func:`label_image_to_sitk` overlays it on the CT.
    """

    labels: np.ndarray
    probabilities: np.ndarray
    levels: list[LevelSegment]
    geometry: SagittalGeometry

    @property
    def missing(self) -> list[str]:
        """Names of the levels not found, in order L1..L4."""
        return [seg.level for seg in self.levels if not seg.found]

    @property
    def status(self) -> str:
        """``"ok"`` when all four levels were found, else ``"partial"`` (also when none was found: the caller
        decides whether that is a failure)."""
        return "ok" if not self.missing else "partial"

    def level(self, name: str) -> LevelSegment:
        """The segment of level ``name`` ("L1".."L4")."""
        for seg in self.levels:
            if seg.level == name:
                return seg
        raise KeyError(name)


def fuse_probabilities(probs: np.ndarray) -> np.ndarray:
    """Mean of the softmax probabilities over the candidate slices.

    Args:
        probs: ``(N, C, rows, cols)`` softmax probabilities (each pixel sums to 1 over C), N ≥ 1.

    Returns:
        float32 ``(C, rows, cols)``, the mean over the N candidates.

    Raises:
        ValueError: for a wrong shape, or values that are not probabilities (e.g. logits).
    """
    p = np.asarray(probs, dtype=np.float32)
    if p.ndim != 4 or p.shape[0] == 0:
        raise ValueError(f"expected probabilities (N, classes, rows, cols) with N >= 1, got shape {p.shape}")
    if p.min() < -1e-6 or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("the network output is not softmax probabilities (apply softmax over classes first)")
    return p.mean(axis=0)


def _missing(label: int, reason: str) -> LevelSegment:
    return LevelSegment(level=LEVEL_NAMES[label - 1], label=label, found=False, reason=reason)


def _inversions(rows: dict[int, float]) -> list[tuple[int, int]]:
    """Pairs (a, b), a < b, of found levels whose centres are not in cranio-caudal order (row a >= row b)."""
    found = sorted(rows)
    return [(a, b) for i, a in enumerate(found) for b in found[i + 1 :] if rows[a] >= rows[b]]


def _order_consistent_core(rows: dict[int, float]) -> set[int]:
    """The found levels that belong to every largest subset of found levels without an inversion."""
    found = sorted(rows)
    subsets = [
        set(combo)
        for k in range(len(found), -1, -1)
        for combo in itertools.combinations(found, k)
        if not _inversions({lab: rows[lab] for lab in combo})
    ]
    largest = [sub for sub in subsets if len(sub) == len(subsets[0])]
    return set.intersection(*largest)


def postprocess(
    fused: np.ndarray,
    geometry: SagittalGeometry,
    pixel_mm: float | None = None,
    min_area_mm2: float = MIN_AREA_MM2,
    min_relabel_probability: float = MIN_RELABEL_PROBABILITY,
) -> SegmentationResult:
    """Label image and per-level segments from the fused probabilities (rules in the module docstring).

    Args:
        fused: float ``(5, rows, cols)`` fused softmax probabilities (:func:`fuse_probabilities`).
        geometry: grid of the sagittal images; a multi-slice stack (the candidates) is replaced by its
            :meth:`~LumbarBMDLib.sagittal.SagittalGeometry.central_plane`, where the fused map lies.
            ``rows = cols = geometry.size``.
        pixel_mm: pixel size (mm) for areas; defaults to ``geometry.pixel_mm``.
        min_area_mm2: a level whose kept component is smaller is missing.
        min_relabel_probability: the least mean probability of its new level that a component must have
            for the ordering rule to relabel it.

    Returns:
        :class:`SegmentationResult` with uint8 labels, the fused probabilities (float32), L1..L4 segments
        and the single-slice geometry.

    Raises:
        ValueError: if ``fused`` is not ``(5, size, size)`` for the geometry's ``size``.
    """
    fused = np.asarray(fused, dtype=np.float32)
    if geometry.n_slices != 1:
        geometry = geometry.central_plane()
    if fused.shape != (NUM_CLASSES, geometry.size, geometry.size):
        raise ValueError(
            f"fused probabilities have shape {fused.shape}, expected {(NUM_CLASSES, geometry.size, geometry.size)}"
        )
    pixel_area = (geometry.pixel_mm if pixel_mm is None else float(pixel_mm)) ** 2
    argmax = np.argmax(fused, axis=0)

    segments: dict[int, LevelSegment] = {}
    masks: dict[int, np.ndarray] = {}
    for label in LEVELS:
        components, n = ndimage.label(argmax == label, structure=_EIGHT_CONNECTED)
        if n == 0:
            segments[label] = _missing(label, REASON_ABSENT)
            continue
        mass = ndimage.sum_labels(fused[label], components, index=np.arange(1, n + 1))
        mask = components == int(np.argmax(mass)) + 1
        area = np.count_nonzero(mask) * pixel_area
        if area < min_area_mm2:
            segments[label] = _missing(label, f"{REASON_TOO_SMALL} ({area:.0f} mm² < {min_area_mm2:.0f} mm²)")
            continue
        masks[label] = mask

    rows = {label: float(ndimage.center_of_mass(mask)[0]) for label, mask in masks.items()}
    relabelled_from: dict[int, int] = {}
    inversions = _inversions(rows)
    if inversions:
        top_to_bottom = sorted(masks, key=lambda lab: (rows[lab], lab))
        mapping = dict(zip_strict(top_to_bottom, sorted(masks)))  # original label → new label
        supported = all(
            float(fused[new][masks[old]].mean()) >= min_relabel_probability
            for old, new in mapping.items()
            if old != new
        )
        new_rows = {new: rows[old] for old, new in mapping.items()}
        if supported and not _inversions(new_rows):
            masks = {new: masks[old] for old, new in mapping.items()}
            relabelled_from = {new: old for old, new in mapping.items() if old != new}
        else:
            for label in sorted(set(masks) - _order_consistent_core(rows)):
                conflicts = ", ".join(
                    f"{LEVEL_NAMES[a - 1]} not above {LEVEL_NAMES[b - 1]}" for a, b in inversions if label in (a, b)
                )
                segments[label] = _missing(label, f"{REASON_ORDER} ({conflicts})")
                del masks[label]

    labels = np.zeros(argmax.shape, dtype=np.uint8)
    for label, mask in masks.items():
        labels[mask] = label
        row, col = ndimage.center_of_mass(mask)
        count = int(np.count_nonzero(mask))
        segments[label] = LevelSegment(
            level=LEVEL_NAMES[label - 1],
            label=label,
            found=True,
            area_mm2=count * pixel_area,
            centre_pixel=(float(col), float(row)),
            centre_lps=geometry.pixel_to_lps([float(col), float(row), 0.0]),
            confidence=float(fused[label][mask].mean()),
            pixel_count=count,
            relabelled_from=relabelled_from.get(label),
        )
    return SegmentationResult(
        labels=labels, probabilities=fused, levels=[segments[label] for label in LEVELS], geometry=geometry
    )


def label_image_to_sitk(result: SegmentationResult) -> sitk.Image:
    """The label image as a one-slice SimpleITK image on its sagittal grid (overlays the CT in any viewer)."""
    return result.geometry.to_sitk(result.labels)
