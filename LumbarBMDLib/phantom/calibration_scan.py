"""A scan of a QCT calibration phantom (K2HPO4 rods in a water-equivalent body) on a phantom scanner.

Asynchronous QCT calibrates a scanner once (and at each QA) with a separately scanned phantom instead of a
phantom under every patient (Brown et al. 2017, J Clin Densitom 20:216). This module makes that scan for the
phantom's vendors, with the same scanner model (PSF, slice profile, noise texture, −1024 outside the
reconstruction circle) as the patients: an elliptical water-equivalent body (320 × 220 mm) with five rods of
K2HPO4 (0, 50, 100, 150, 200 mg/cm³; Ø 25 mm) in a fixed layout, :data:`LumbarBMDLib.calibration.ROD_LAYOUT`.
"""

from __future__ import annotations

import numpy as np

from LumbarBMDLib.calibration import ROD_LAYOUT, ROD_RADIUS_MM
from LumbarBMDLib.phantom.render import acquire
from LumbarBMDLib.phantom.scanner import ScannerProfile, scanner_profile
from LumbarBMDLib.phantom.shapes import Grid, ellipse_distance, fraction
from LumbarBMDLib.volume import CTVolume

BODY_HALF_AXES_MM = (160.0, 110.0)


def calibration_scan(vendor: str | ScannerProfile, seed: int = 0, slices: int = 40) -> CTVolume:
    """CT (int16 HU, axial LPS, 512 × 512 × ``slices``, 0.8 × 0.8 × 1 mm) of the calibration phantom on ``vendor``
    (a vendor letter, or a profile such as :func:`~LumbarBMDLib.phantom.physical_scanner.profile_from_physics`)."""
    scanner = vendor if isinstance(vendor, ScannerProfile) else scanner_profile(vendor)
    vendor = scanner.vendor
    pixel = 0.8
    half = (512 - 1) / 2.0 * pixel
    grid = Grid(shape=(slices, 512, 512), spacing=(pixel, pixel, 1.0), origin=(-half, -half, 0.0))
    x = (np.arange(512) * pixel - half)[None, :]
    y = (np.arange(512) * pixel - half)[:, None]
    h = pixel
    plane = np.full((512, 512), -1000.0, np.float32)
    body = fraction(ellipse_distance(x, y, *BODY_HALF_AXES_MM), h)
    plane += body * (np.float32(0.0) - plane)  # water-equivalent body: 0 HU by definition of HU
    for (cx, cy), conc in ROD_LAYOUT:
        f = fraction(ellipse_distance(x - cx, y - cy, ROD_RADIUS_MM, ROD_RADIUS_MM), h)
        plane += f * (np.float32(scanner.mineral_to_hu(conc)) - plane)
    ideal = np.repeat(plane[None], slices, axis=0)
    hu = acquire(ideal, grid, scanner, BODY_HALF_AXES_MM[1], None, np.random.default_rng(seed))
    return CTVolume(hu=hu, spacing=grid.spacing, origin=grid.origin, source=f"calibration phantom, vendor {vendor}",
                    metadata={"vendor": vendor, "rods_mg_cm3": [c for _, c in ROD_LAYOUT]})
