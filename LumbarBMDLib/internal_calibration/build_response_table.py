"""Regenerate ``response_table.json``: per-element detected-energy-weighted mass attenuation of a grid of CT spectra.

Run (needs the ``phantom-physics`` extra, xraydb and spekpy; about 4 minutes)::

    python -m LumbarBMDLib.internal_calibration.build_response_table

Why a table: the scanner-response fit (:mod:`LumbarBMDLib.internal_calibration.fit`) runs inside the pipeline, which
must not need spekpy (a 164 MB wheel, ~0.7 s per spectrum). In the first-order model of
:mod:`LumbarBMDLib.phantom.physics` a material's mean attenuation is linear in its composition,
μ̄_m = ρ_m Σ_el f_el · (μ/ρ)‾_el with (μ/ρ)‾_el = Σ_E w(E) μ/ρ_el(E) (w: the normalised E·Φ_detected weights), so
the 14 element values per spectrum give the exact μ̄ of *any* material on that spectrum. Each row also carries the
spectrum's effective energy (the energy at which water's μ equals μ̄_water, physics.effective_energy_kev), by which
the fit indexes the spectra.

Grid: kVp 80–140 (step 10) × total Al filtration 3, 6, 9, 12 mm × extra Cu 0, 0.2, 0.4 mm × patient water path
15, 25, 35, 45 cm, tungsten anode 12° (336 spectra): from a slim patient on a lightly filtered tube to a large
patient behind a copper (tin-like) filter, covering the effective energies of clinical abdominal CT (≈ 50–90 keV).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from LumbarBMDLib.phantom import physics as ph

TABLE_PATH = Path(__file__).with_name("response_table.json")
SCHEMA = "lumbarbmd-response-table/1"

KVPS = (80.0, 90.0, 100.0, 110.0, 120.0, 130.0, 140.0)
FILTRATION_MM_AL = (3.0, 6.0, 9.0, 12.0)
FILTRATION_MM_CU = (0.0, 0.2, 0.4)
PATIENT_WATER_CM = (15.0, 25.0, 35.0, 45.0)
ANODE_ANGLE_DEG = 12.0


def element_mass_attenuation(scanner: ph.ScannerPhysics, elements: tuple[str, ...]) -> list[float]:
    """Detected-energy-weighted mean μ/ρ (cm²/g) of each element on ``scanner`` (coherent scattering included)."""
    energy, w = ph.detector_weights(scanner)
    out = []
    for el in elements:
        pure = ph.Material.of(el, 1.0, {el: 1.0})
        out.append(float(np.sum(w * pure.mass_attenuation(energy))))
    return out


def build_rows(elements: tuple[str, ...]) -> list[dict]:
    """One row per grid spectrum (see the module docstring)."""
    rows = []
    for kvp, al, cu, patient in itertools.product(KVPS, FILTRATION_MM_AL, FILTRATION_MM_CU, PATIENT_WATER_CM):
        sc = ph.ScannerPhysics(name="grid", kvp=kvp, anode_angle_deg=ANODE_ANGLE_DEG, filtration_mm_al=al,
                               filtration_mm_cu=cu, patient_water_cm=patient)
        rows.append({"kvp": kvp, "filtration_mm_al": al, "filtration_mm_cu": cu, "patient_water_cm": patient,
                     "effective_energy_kev": round(ph.effective_energy_kev(sc), 5),
                     "mu_rho": [round(v, 7) for v in element_mass_attenuation(sc, elements)]})
    return rows


def main(path: Path = TABLE_PATH) -> Path:
    """Compute the grid and write the JSON table atomically."""
    t0 = time.time()
    elements = tuple(ph.ATOMIC_MASS)
    table = {
        "schema": SCHEMA,
        "generated_by": "python -m LumbarBMDLib.internal_calibration.build_response_table",
        "model": "LumbarBMDLib.phantom.physics: SpekPy tungsten spectrum (anode 12 deg) through Al/Cu filtration and "
                 "a water patient; energy-integrating detector (w = E * fluence); xraydb (Elam) total mu/rho with "
                 "coherent scattering",
        "units": {"mu_rho": "cm2/g, detected-energy-weighted mean", "effective_energy_kev": "keV (water)"},
        "elements": list(elements),
        "rows": build_rows(elements),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(table, separators=(",", ":")) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {path} ({len(table['rows'])} spectra, {time.time() - t0:.0f} s)")
    return path


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else TABLE_PATH)
