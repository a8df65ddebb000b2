"""The network's segmentation renumbered by the anatomy (DESIGN.md "Method" 4).

The R2U-Net's classes are not trusted to tell neighbouring vertebrae apart (the paper's limitation 3; on real CTs it
also labels the heart, vessels or the canal). Its *foreground* (any of L1–L4, fused over the candidates) is split
by the vertebral-body chain found on the CT instead:

* each identified level L1–L4 is the largest foreground component inside its chain body's region on the sagittal
  plane: between the planes of the discs above and below it, in front of the canal (``REGION_A_MM``);
* foreground that lies on no L1–L4 body (T12, L5, the sacrum, the heart, a vessel, the canal) is dropped, and each
  dropped segment is listed with where it lay;
* a body the chain identified but the network left empty is outlined classically (the bone in front of the canal
  between its discs), flagged for the radiologist to check;
* when the network's own class disagrees with the anatomy, that is recorded (the anatomy wins).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from LumbarBMDLib._compat import zip_strict
from LumbarBMDLib.localisation import LevelLocation
from LumbarBMDLib.sagittal import SagittalGeometry
from LumbarBMDLib.spine.chain import Disc, VertebralChain
from LumbarBMDLib.spine.numbering import LEVEL_NAMES, QCFlag, SpineIdentification

FOREGROUND_PROBABILITY = 0.5  # a pixel is vertebral body when the fused probability of L1–L4 together reaches this
MIN_AREA_MM2 = 150.0  # as segmentation_post: a lumbar body's mid-sagittal section covers several hundred mm²
REGION_A_MM = (3.0, 80.0)  # a body's region: from just in front of the canal's centre to beyond the largest body
OUTLINE_BONE_HU = 100.0  # classical outline: spongiosa and cortex (soft tissue ≤ 70 HU), holes filled
OUTLINE_DISK_MM = 10.0  # … and when even that finds nothing (metal, a collapsed body), a disk at the body's centre
DROP_OVERLAP = 0.5  # a foreground segment with less than this inside any L1–L4 region is dropped
_EIGHT = np.ones((3, 3), bool)


@dataclass
class AnatomicalLevel:
    """One level of the anatomically numbered segmentation.

    Attributes:
        level: "L1".."L4".
        found: whether it has a segment in :attr:`AnatomicalSegmentation.labels`.
        source: "network", "classical outline" (the network left the body empty) or None.
        reason: why it has no segment ("" when found).
        area_mm2: area of its segment.
        confidence: mean fused foreground probability over its segment (0 for a classical outline).
        network_level: the network's own majority class inside the segment ("L1".."L4"), None when none.
        body: chain index of its body.
    """

    level: str
    found: bool
    source: str | None = None
    reason: str = ""
    area_mm2: float = 0.0
    confidence: float = 0.0
    network_level: str | None = None
    body: int | None = None


@dataclass
class AnatomicalSegmentation:
    """L1–L4 labels on the sagittal plane, numbered by the anatomy.

    Attributes:
        labels: uint8 ``(rows, cols)``, 0 background, 1–4 = L1–L4.
        geometry: its single-slice grid.
        levels: L1..L4.
        dropped: sentences describing the network's segments that were dropped.
    """

    labels: np.ndarray
    geometry: SagittalGeometry
    levels: list[AnatomicalLevel]
    dropped: list[str] = field(default_factory=list)


def plane_frame_coordinates(geometry: SagittalGeometry, chain: VertebralChain) -> tuple[np.ndarray, np.ndarray,
                                                                                          np.ndarray]:
    """For every pixel of the sagittal plane: its LPS point ``(rows, cols, 3)``, the arc length ``s`` of the nearest
    point of the chain's frame and its offset ``a`` (mm in front of the canal's centre line), both ``(rows, cols)``."""
    n = geometry.size
    cols, rows = np.meshgrid(np.arange(n, dtype=float), np.arange(n, dtype=float))
    pts = geometry.pixel_to_lps(np.stack([cols.ravel(), rows.ravel(), np.zeros(n * n)], axis=1))
    frame = chain.frame
    tree = cKDTree(frame.centre_lps[:, 1:])  # (y, z): the plane is sagittal, x is constant on it
    _, idx = tree.query(pts[:, 1:])
    a = np.einsum("ij,ij->i", pts - frame.centre_lps[idx], frame.anterior[idx])
    return pts.reshape(n, n, 3), frame.s_mm[idx].reshape(n, n), a.reshape(n, n)


def _disc_at(chain: VertebralChain, s_mm: float) -> Disc | None:
    for d in chain.discs:
        if abs(d.s_mm - s_mm) < 1e-6:
            return d
    return None


def body_region(chain: VertebralChain, body: int, pts: np.ndarray, s: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Bool ``(rows, cols)``: the pixels of chain body ``body``'s region (between its discs' planes, in front of the
    canal within ``REGION_A_MM``); at a chain end without a disc, the zone's end along the frame."""
    b = chain.bodies[body]
    region = (a >= REGION_A_MM[0]) & (a <= REGION_A_MM[1])
    above, below = _disc_at(chain, b.zone_top_s_mm), _disc_at(chain, b.zone_bottom_s_mm)
    region &= above.below(pts) if above is not None else s >= b.zone_top_s_mm
    region &= ~below.below(pts) if below is not None else s <= b.zone_bottom_s_mm
    return region


def _largest(mask: np.ndarray) -> np.ndarray:
    comps, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return mask
    sizes = np.bincount(comps.ravel())[1:]
    return comps == int(np.argmax(sizes)) + 1


def _disk_at(geometry: SagittalGeometry, centre_lps: np.ndarray, radius_mm: float) -> np.ndarray:
    """A disk of ``radius_mm`` on the sagittal plane around the projection of ``centre_lps``."""
    col, row, _ = geometry.lps_to_pixel(np.asarray(centre_lps, dtype=float))
    rows, cols = np.ogrid[: geometry.size, : geometry.size]
    return ((rows - row) ** 2 + (cols - col) ** 2) * geometry.pixel_mm**2 <= radius_mm**2


def classical_outline(image_hu: np.ndarray, region: np.ndarray, a: np.ndarray, column_a_mm: float) -> np.ndarray:
    """The body on the sagittal image from the anatomy alone: inside its region and within the body's depth around
    the column's centre (``column_a_mm`` ± its distance to the canal's front), the pixels of bone (≥
    ``OUTLINE_BONE_HU`` after a 1-pixel smoothing) with their holes filled (an osteoporotic spongiosa inside its
    cortex); the whole depth box when that finds less than the minimum area."""
    half = max(column_a_mm - REGION_A_MM[0], 8.0)
    box = region & (a >= column_a_mm - half) & (a <= column_a_mm + half)
    bone = ndimage.gaussian_filter(np.nan_to_num(image_hu, nan=-1000.0), 1.0) >= OUTLINE_BONE_HU
    mask = _largest(ndimage.binary_fill_holes(bone & box))
    return mask if mask.any() else box


def anatomical_labels(fused: np.ndarray, geometry: SagittalGeometry, ident: SpineIdentification,
                      image_hu: np.ndarray) -> AnatomicalSegmentation:
    """Split the network's fused L1–L4 foreground by the identified chain (see the module docstring).

    Args:
        fused: float ``(5, rows, cols)`` fused softmax probabilities (0 = background, 1–4 = the network's L1–L4).
        geometry: their single-slice sagittal grid.
        ident: the numbered chain (:func:`~LumbarBMDLib.spine.identify_spine`); when not numbered, every level is
            missing with its refusal.
        image_hu: float ``(rows, cols)`` sagittal image (HU) on the same grid, for classical outlines.
    """
    if geometry.n_slices != 1:
        geometry = geometry.central_plane()
    labels = np.zeros(fused.shape[1:], np.uint8)
    pixel_area = geometry.pixel_mm**2
    if not ident.numbered:
        levels = [AnatomicalLevel(name, False, reason=lv.reason)
                  for name, lv in zip_strict(LEVEL_NAMES, ident.levels)]
        return AnatomicalSegmentation(labels, geometry, levels)
    chain = ident.chain
    pts, s, a = plane_frame_coordinates(geometry, chain)
    foreground_p = 1.0 - fused[0]
    foreground = foreground_p >= FOREGROUND_PROBABILITY
    network_class = np.argmax(fused[1:], axis=0) + 1
    regions: dict[int, np.ndarray] = {}
    levels = []
    for value, lv in enumerate(ident.levels, start=1):
        if not lv.identified or lv.body is None:
            levels.append(AnatomicalLevel(lv.level, False, reason=lv.reason))
            continue
        region = body_region(chain, lv.body, pts, s, a)
        regions[value] = region
        mask = _largest(foreground & region)
        area = float(mask.sum() * pixel_area)
        source = "network"
        if area < MIN_AREA_MM2:
            mask = classical_outline(image_hu, region, a, chain.bodies[lv.body].column_a_mm)
            area = float(mask.sum() * pixel_area)
            source = "classical outline"
            if area < MIN_AREA_MM2:  # (metal, a collapsed body): a disk at the body's centre, for the patch's checks
                mask = _disk_at(geometry, chain.bodies[lv.body].centre_lps, OUTLINE_DISK_MM)
                area = float(mask.sum() * pixel_area)
        labels[mask & (labels == 0)] = value
        votes = np.bincount(network_class[mask & foreground], minlength=5)[1:]
        net = LEVEL_NAMES[int(np.argmax(votes))] if votes.sum() else None
        conf = float(foreground_p[mask].mean()) if source == "network" else 0.0
        levels.append(AnatomicalLevel(lv.level, True, source, "", area, conf, net, lv.body))
    dropped = []
    comps, n = ndimage.label(foreground, structure=_EIGHT)
    union = np.zeros_like(foreground)
    for r in regions.values():
        union |= r
    for m in range(1, n + 1):
        comp = comps == m
        area = comp.sum() * pixel_area
        if area < MIN_AREA_MM2 or (comp & union).sum() >= DROP_OVERLAP * comp.sum():
            continue
        votes = np.bincount(network_class[comp], minlength=5)[1:]
        said = LEVEL_NAMES[int(np.argmax(votes))]
        dropped.append(f"a network segment labelled {said} ({area:.0f} mm²) lies on {_where(ident, comp, pts, s, a)}: "
                       "dropped")
    return AnatomicalSegmentation(labels, geometry, levels, dropped)


def _where(ident: SpineIdentification, comp: np.ndarray, pts: np.ndarray, s: np.ndarray, a: np.ndarray) -> str:
    """Where a segment lies, in words: the name of the chain body holding most of it, or no vertebral body."""
    chain = ident.chain
    best, best_count = None, 0
    for i in range(len(chain.bodies)):
        count = int((comp & body_region(chain, i, pts, s, a)).sum())
        if count > best_count:
            best, best_count = i, count
    if best is None or best_count < 0.5 * comp.sum():
        mean_a = float(a[comp].mean())
        return "the spinal canal" if mean_a < REGION_A_MM[0] else "no vertebral body (in front of the spine)"
    name = ident.names[best]
    return name if name else "an unnumbered vertebra"


def edited_levels(labels: np.ndarray, geometry: SagittalGeometry, ident: SpineIdentification | None,
                  centres: list[LevelLocation]) -> tuple[list[LevelLocation], list[QCFlag]]:
    """Check a person's L1–L4 labels against the vertebral chain.

    Two levels drawn on one chain body are not measured (a BMD of the same vertebra twice under two names is
    wrong whichever name is right); a level drawn on a body that the anatomy numbers differently is measured as drawn
    and flagged.

    Args:
        labels: uint8 ``(rows, cols)`` (or ``(1, rows, cols)``) edited labels on ``geometry``'s plane.
        centres: :func:`~LumbarBMDLib.localisation.level_centres` of those labels.
    """
    if ident is None or not ident.chain.bodies:
        return centres, []
    labels = np.asarray(labels)
    labels = labels[0] if labels.ndim == 3 else labels
    plane = geometry if geometry.n_slices == 1 else geometry.central_plane()
    pts, s, a = plane_frame_coordinates(plane, ident.chain)
    regions = [body_region(ident.chain, i, pts, s, a) for i in range(len(ident.chain.bodies))]
    body_of: dict[str, int] = {}
    for value, c in enumerate(centres, start=1):
        if not c.found:
            continue
        mask = labels == value
        counts = [int((mask & r).sum()) for r in regions]
        if max(counts) >= 0.5 * mask.sum():
            body_of[c.level] = int(np.argmax(counts))
    flags: list[QCFlag] = []
    out = []
    for c in centres:
        same = [other for other, b in body_of.items() if other != c.level and b == body_of.get(c.level)]
        if c.found and same:
            names = " and ".join(sorted([c.level, *same]))
            out.append(LevelLocation(c.level, False, f"not measured: {names} are drawn on the same vertebra; correct "
                                     "the labels", c.centre_lps, c.area_mm2))
            continue
        out.append(c)
        body = body_of.get(c.level)
        if c.found and body is not None and ident.numbered and ident.names[body] and ident.names[body] != c.level:
            flags.append(QCFlag("edited_label_disagrees", f"{c.level} is drawn on the vertebra that the anatomy "
                                f"numbers {ident.names[body]}; measured as drawn"))
    return out, flags


def as_segmentation_result(anatomical: AnatomicalSegmentation, fused: np.ndarray):
    """The anatomical labels as a :class:`~LumbarBMDLib.segmentation_post.SegmentationResult` (for the files and the
    preview that ``lumbarbmd segment`` writes): per level its centre, area and confidence, or why it is missing."""
    from LumbarBMDLib.segmentation_post import LevelSegment, SegmentationResult

    geometry = anatomical.geometry
    pixel_area = geometry.pixel_mm**2
    levels = []
    for value, lv in enumerate(anatomical.levels, start=1):
        mask = anatomical.labels == value
        if not lv.found or not mask.any():
            levels.append(LevelSegment(lv.level, value, False, lv.reason or "not found"))
            continue
        rows, cols = np.nonzero(mask)
        centre = (float(cols.mean()), float(rows.mean()))
        levels.append(LevelSegment(lv.level, value, True, "", float(mask.sum() * pixel_area), centre,
                                   geometry.pixel_to_lps([centre[0], centre[1], 0.0]), lv.confidence,
                                   int(mask.sum())))
    return SegmentationResult(anatomical.labels, np.asarray(fused, np.float32), levels, geometry)
