"""Scanner calibration for BMD (asynchronous QCT): HU of K2HPO4 per mg/cm³ on a scanner, and the mapping of a
scanner's HU onto the reference (training) scanner's scale.

Why: the DenseNet learns BMD from the HU of the training scanner. Another scanner at the same kVp turns the
same mineral into other HU (its calibration slope and intercept differ with effective energy and kernel), which
is the systematic bias the paper saw on two other vendors (its limitation 1). A patch-only network cannot see
the scanner's calibration, and soft tissue (fat, muscle) does not reveal the mineral slope. Asynchronous QCT
solves exactly this: each scanner is calibrated once with a K2HPO4 phantom scan; a patient scan's HU are then
mapped onto the reference scanner's mineral scale before the patch goes into the network:

    HU_ref = intercept_ref + slope_ref · (HU − intercept_scan) / slope_scan

``lumbarbmd calibrate SCAN --out scanner.json`` measures a scanner's calibration from a scan of the phantom
layout below (:func:`fit_calibration`); the regression model card stores the training scanner's own
calibration (the reference).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.volume import CTVolume

#: Rod centres (x, y) in mm from the phantom body's centre, LPS axes, with K2HPO4 concentrations (mg/cm³).
ROD_LAYOUT: tuple[tuple[tuple[float, float], float], ...] = (
    ((-90.0, 0.0), 0.0),
    ((-45.0, 40.0), 50.0),
    ((0.0, 0.0), 100.0),
    ((45.0, 40.0), 150.0),
    ((90.0, 0.0), 200.0),
)
ROD_RADIUS_MM = 12.5
ROI_RADIUS_MM = 8.0  # measured inside each rod, away from its partial-volume rim


@dataclass
class ScannerCalibration:
    """A scanner's mineral calibration: HU = ``slope`` · BMD + ``intercept`` (BMD in mg/cm³ K2HPO4).

    Attributes:
        slope: HU per mg/cm³.
        intercept: HU of 0 mg/cm³.
        r2: coefficient of determination of the rod fit.
        rods: ``[[mg/cm³, mean HU, SD HU], ...]`` as measured.
        source: the scan it came from.
    """

    slope: float
    intercept: float
    r2: float = 1.0
    rods: list[list[float]] = field(default_factory=list)
    source: str = ""

    def to_reference(self, reference: ScannerCalibration) -> tuple[float, float]:
        """``(a, b)`` with HU_ref = a · HU + b, mapping this scanner's HU onto ``reference``'s mineral scale."""
        a = reference.slope / self.slope
        return a, reference.intercept - a * self.intercept

    def as_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ScannerCalibration:
        try:
            cal = cls(float(data["slope"]), float(data["intercept"]), float(data.get("r2", 1.0)),
                      list(data.get("rods", [])), str(data.get("source", "")))
        except (KeyError, TypeError, ValueError):
            raise LumbarBMDError("a scanner calibration needs numeric 'slope' and 'intercept'") from None
        if not 0.3 < cal.slope < 3.0:
            raise LumbarBMDError(f"calibration slope {cal.slope:.3f} HU per mg/cm³ is implausible (0.3–3)")
        return cal


def read_calibration(path: str | Path) -> ScannerCalibration:
    """A calibration JSON written by ``lumbarbmd calibrate``."""
    path = Path(path)
    if not path.is_file():
        raise LumbarBMDError(f"scanner calibration file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LumbarBMDError(f"scanner calibration {path} is not valid JSON: {err}") from None
    return ScannerCalibration.from_json(data)


def write_calibration(cal: ScannerCalibration, path: str | Path) -> Path:
    """Write atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(cal.as_json(), indent=1), encoding="utf-8")
    tmp.replace(path)
    return path


def fit_calibration(volume: CTVolume, layout=ROD_LAYOUT) -> ScannerCalibration:
    """Measure the rods of a calibration-phantom scan and fit HU = slope · BMD + intercept (least squares).

    The phantom body is the largest region above −500 HU in the central slices; its centroid places the rod
    layout; each rod is a circular ROI of :data:`ROI_RADIUS_MM` over the central half of the slices.
    """
    from scipy import ndimage, stats  # here, not on import: reading a calibration file needs no SciPy

    nz = volume.hu.shape[0]
    z0, z1 = nz // 4, max(nz // 4 + 1, 3 * nz // 4)
    hu = volume.hu[z0:z1].astype(np.float32)
    body = hu.mean(axis=0) > -500.0
    lab, n = ndimage.label(body)
    if n == 0:
        raise LumbarBMDError("no calibration phantom found in the scan (nothing above −500 HU)")
    sizes = np.bincount(lab.ravel())[1:]
    largest = lab == int(np.argmax(sizes)) + 1
    jc, ic = np.argwhere(largest).mean(axis=0)
    centre = volume.index_to_lps([ic, jc, (z0 + z1 - 1) / 2.0])
    sx, sy = volume.spacing[0], volume.spacing[1]
    jj, ii = np.mgrid[0 : hu.shape[1], 0 : hu.shape[2]]
    rods = []
    for (dx, dy), conc in layout:
        ij = volume.lps_to_index(centre + np.array([dx, dy, 0.0]))
        roi = ((ii - ij[0]) * sx) ** 2 + ((jj - ij[1]) * sy) ** 2 <= ROI_RADIUS_MM**2
        if not (roi & largest).sum() > 0.9 * roi.sum() or roi.sum() == 0:
            raise LumbarBMDError(f"the {conc:g} mg/cm³ rod lies outside the scanned phantom: is this the calibration "
                                 "phantom of the documented layout?")
        values = hu[:, roi]
        rods.append([float(conc), float(values.mean()), float(values.std())])
    conc, mean = np.array([r[0] for r in rods]), np.array([r[1] for r in rods])
    fit = stats.linregress(conc, mean)
    if fit.rvalue**2 < 0.98 or not 0.3 < fit.slope < 3.0:
        raise LumbarBMDError(f"the rods do not follow a calibration line (slope {fit.slope:.3f} HU per mg/cm³, "
                             f"r² {fit.rvalue**2:.3f}): check the phantom and the scan")
    return ScannerCalibration(float(fit.slope), float(fit.intercept), float(fit.rvalue**2), rods, volume.source)
