"""Benchmark: accuracy and speed of the scanner-response fit (issue 15) over random physical scanners.

Usage:  python benchmarks/bench_internal_fit.py [--scanners 200] [--seed 15] [--no-kvp] [--json OUT]

Each scanner is drawn at random (kVp 80–140 in steps of 10 as a DICOM tag allows, anode 8–16°, 2–14 mm Al,
0–0.5 mm Cu, 15–45 cm of water, water offset ±5 HU, air offset ±5 HU), mostly *off* the response table's grid.
Its tissues' HU come from :mod:`LumbarBMDLib.phantom.physics` (SpekPy + xraydb: the full polyenergetic model, which
the fit only sees through its effective-energy table), with biological variation drawn to match the fit's floors
and ROI noise at realistic ROI sizes (:func:`synthetic_measurements`). The truth is physics.py's own K2HPO4 line
on that scanner. Printed: bias and 95 % limits of agreement (Bland-Altman) of the recovered BMD at 30, 50, 100,
200 and 250 mg/cm³ (relative, %), the worst case, the verdicts, and the time per fit (the physics simulation is
not timed). Needs the phantom-physics extra (≈ 0.8 s of SpekPy per scanner).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import numpy as np

from LumbarBMDLib.internal_calibration import fit
from LumbarBMDLib.phantom import physics as ph

BMD_LEVELS = (30.0, 50.0, 100.0, 200.0, 250.0)

#: Biological variation drawn in the synthetic tissues, as mixing fractions / density changes whose HU spread at
#: 120 kVp matches the fit's floors (fit.REFERENCE_TISSUES): fat between adipose tissue 3 and 2 (Woodard & White;
#: 22 HU apart, SD 0.45 → 10 HU), muscle with a little fat (SD 3.3 % → 5 HU), blood density (hematocrit, SD 0.45 %
#: → 5 HU), cortical bone density (SD 5 % → ≈ 130 HU), air none beyond noise (SD 1 HU).
BIO_SD = {"fat": 0.45, "muscle": 0.033, "blood": 0.0045, "bone": 0.05, "air": 1.0}

#: ROI sizes (voxels) and the ROI's SD relative to image noise: air outside the body, subcutaneous and visceral
#: fat, paraspinal muscle, aortic blood, cortical bone (the ROI finder's typical ROIs: assumption).
ROI = {"air": (5000, 1.0), "subcutaneous_fat": (3000, 1.1), "visceral_fat": (2000, 1.3), "muscle": (1500, 1.2),
       "blood": (800, 1.0), "cortical_bone": (300, 3.0)}


@dataclass(frozen=True)
class Truth:
    """The true K2HPO4 line of a synthetic scanner: HU = intercept + slope · c."""

    slope: float
    intercept: float
    effective_energy_kev: float


def random_scanner(rng: np.random.Generator, name: str = "random") -> ph.ScannerPhysics:
    """A random clinical-ish scanner (see the module docstring)."""
    return ph.ScannerPhysics(
        name=name, kvp=float(rng.choice([80, 90, 100, 110, 120, 130, 140])),
        anode_angle_deg=float(rng.uniform(8, 16)), filtration_mm_al=float(rng.uniform(2, 14)),
        filtration_mm_cu=float(rng.choice([0.0, 0.0, rng.uniform(0, 0.5)])),
        patient_water_cm=float(rng.uniform(15, 45)), water_offset_hu=float(rng.uniform(-5, 5)),
        air_offset_hu=float(rng.uniform(-5, 5)), noise_sd_hu=float(rng.uniform(10, 30)))


def truth(scanner: ph.ScannerPhysics) -> Truth:
    """physics.py's K2HPO4 line and effective energy for ``scanner``."""
    return Truth(ph.k2hpo4_slope(scanner), ph.tissue_hu(scanner, ph.k2hpo4_solution(0.0)),
                 ph.effective_energy_kev(scanner))


def synthetic_measurements(scanner: ph.ScannerPhysics, rng: np.random.Generator,
                           tissues: tuple[str, ...] = ("air", "subcutaneous_fat", "visceral_fat", "muscle", "blood"),
                           bio_scale: float = 1.0) -> dict[str, tuple[float, float, int]]:
    """``{tissue: (median HU, SD HU, voxels)}`` as an ROI finder would measure them on ``scanner``.

    Biology (:data:`BIO_SD` × ``bio_scale``) moves each tissue along a physical direction (a mixture or a density
    change, computed on this scanner's spectrum); the median carries the ROI noise of :data:`ROI`.
    """
    hu = {k: ph.tissue_hu(scanner, m) for k, m in
          (("air", ph.AIR), ("fat2", ph.ADIPOSE), ("fat3", ph.ADIPOSE_3), ("muscle", ph.MUSCLE),
           ("blood", ph.BLOOD), ("bone", ph.CORTICAL_BONE))}
    w, a = scanner.water_offset_hu, scanner.air_offset_hu
    gain = 1000.0 + w - a

    def density_change(value: float, delta: float) -> float:  # μ̄ → (1 + δ) μ̄ (μ̄_air ≈ 0)
        return value + delta * (value - w + gain)

    out = {}
    for name in tissues:
        kind = fit.REFERENCE_TISSUES[name].kind
        u = rng.normal(0.0, BIO_SD[kind] * bio_scale)
        if kind == "fat":
            value = hu["fat3"] + u * (hu["fat2"] - hu["fat3"])
        elif kind == "muscle":
            value = hu["muscle"] + u * (hu["fat3"] - hu["muscle"])
        elif kind == "blood":
            value = density_change(hu["blood"], u)
        elif kind == "bone":
            value = density_change(hu["bone"], u)
        else:
            value = hu["air"] + u
        n, texture = ROI[name]
        sd = scanner.noise_sd_hu * texture
        value += rng.normal(0.0, fit.MEDIAN_EFFICIENCY * sd * np.sqrt(fit.NOISE_CORRELATION_VOXELS / n))
        out[name] = (float(value), float(sd), int(n))
    return out


def bmd_errors_percent(cal: fit.InternalCalibration, true: Truth) -> dict[float, float]:
    """Relative error (%) of the recovered BMD at :data:`BMD_LEVELS` (trabecular HU from the true line)."""
    return {c: 100.0 * (cal.bmd_from_hu(true.intercept + true.slope * c) - c) / c for c in BMD_LEVELS}


def run(n: int, seed: int, use_kvp: bool, bio_scale: float = 1.0, use_size: bool = True) -> dict:
    """Fit ``n`` random scanners; the summary as a dict."""
    rng = np.random.default_rng(seed)
    errors: dict[float, list[float]] = {c: [] for c in BMD_LEVELS}
    times, verdicts, energy_err, worst = [], {"ok": 0, "poor": 0}, [], (0.0, "")
    fit.fit_scanner_response(synthetic_measurements(ph.ScannerPhysics(name="warm", kvp=120), rng), kvp=120)
    for i in range(n):
        sc = random_scanner(rng, f"random-{i}")
        true = truth(sc)
        meas = synthetic_measurements(sc, rng, bio_scale=bio_scale)
        t0 = time.perf_counter()
        cal = fit.fit_scanner_response(meas, kvp=sc.kvp if use_kvp else None,
                                       patient_water_cm=sc.patient_water_cm if use_size else None)
        times.append(time.perf_counter() - t0)
        verdicts[cal.verdict] += 1
        energy_err.append(cal.effective_energy_kev - true.effective_energy_kev)
        for c, e in bmd_errors_percent(cal, true).items():
            errors[c].append(e)
            if abs(e) > abs(worst[0]):
                worst = (e, f"{sc.kvp:g} kVp, {sc.filtration_mm_al:.1f} mm Al, {sc.filtration_mm_cu:.2f} mm Cu, "
                            f"{sc.patient_water_cm:.0f} cm, at {c:g} mg/cm³")
    summary = {"scanners": n, "seed": seed, "kvp_used": use_kvp, "patient_size_used": use_size,
               "bio_scale": bio_scale, "verdicts": verdicts,
               "effective_energy_error_kev": {"bias": float(np.mean(energy_err)), "sd": float(np.std(energy_err))},
               "bmd_error_percent": {}, "worst_percent": worst[0], "worst_case": worst[1],
               "fit_ms": {"median": 1e3 * statistics.median(times), "max": 1e3 * max(times)}}
    for c, e in errors.items():
        arr = np.array(e)
        summary["bmd_error_percent"][c] = {"bias": float(arr.mean()), "loa_low": float(arr.mean() - 1.96 * arr.std()),
                                           "loa_high": float(arr.mean() + 1.96 * arr.std()),
                                           "within_2pct": float(np.mean(np.abs(arr) <= 2.0)),
                                           "max_abs": float(np.abs(arr).max())}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scanners", type=int, default=200)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--no-kvp", action="store_true", help="fit without the DICOM kVp prior")
    parser.add_argument("--bio-scale", type=float, default=1.0,
                        help="biological variation × this (0: the tissues are exactly their reference compositions)")
    parser.add_argument("--no-size", action="store_true",
                        help="fit without the patient's water-equivalent diameter (known here from the simulation)")
    parser.add_argument("--json", default=None, help="also write the summary here")
    args = parser.parse_args()
    s = run(args.scanners, args.seed, not args.no_kvp, args.bio_scale, not args.no_size)
    print(f"{s['scanners']} random scanners (seed {s['seed']}), DICOM kVp {'used' if s['kvp_used'] else 'not used'}, "
          f"patient size {'used' if s['patient_size_used'] else 'not used'}; "
          f"biology × {s['bio_scale']:g}; verdicts {s['verdicts']}")
    ee = s["effective_energy_error_kev"]
    print(f"effective energy error: bias {ee['bias']:+.2f} keV, SD {ee['sd']:.2f} keV")
    print("BMD (mg/cm³)  bias %   95% LoA %          within ±2 %   max |err| %")
    for c, r in s["bmd_error_percent"].items():
        print(f"{c:>10g}  {r['bias']:+6.2f}   {r['loa_low']:+6.2f} .. {r['loa_high']:+6.2f}   "
              f"{100 * r['within_2pct']:6.0f} %     {r['max_abs']:6.2f}")
    print(f"worst: {s['worst_percent']:+.2f} % ({s['worst_case']})")
    print(f"time per fit: median {s['fit_ms']['median']:.1f} ms, max {s['fit_ms']['max']:.1f} ms")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(s, fh, indent=1)


if __name__ == "__main__":
    main()
