"""Synthetic lumbar CT phantoms with exact ground truth (``lumbarbmd phantom``).

There is no public CT data with QCT reference values, so the phantom is the project's ground truth: a
patient (spine T11–sacrum on a lordotic curve, vertebral bodies with cortex, endplates and textured
spongiosa, discs, posterior elements around a CSF-filled canal, ribs, pelvis, muscles, organs, vessels,
bowel, table) drawn from published anatomical ranges, scanned by a vendor profile (calibration, noise,
kernel, slice profile). Everything is deterministic by seed: the same seed gives the same patient on
every vendor (paired comparisons), and the scanner's noise depends on seed and vendor.

A scanner the project never saw can be given physically instead of a vendor letter (``scanner=`` a
:class:`~LumbarBMDLib.phantom.physics.ScannerPhysics` or its JSON; ``lumbarbmd phantom --scanner FILE``): see
:mod:`LumbarBMDLib.phantom.physical_scanner`. Vendors A, B, C are unchanged by it.

Public API: :func:`generate_case`, :func:`write_case`, :func:`generate_cohort`.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from LumbarBMDLib.phantom.anatomy import (
    BODY_LABELS,
    LUMBAR_LEVELS,
    POSTERIOR_OFFSET,
    Patient,
    category_of,
    sample_patient,
)
from LumbarBMDLib.phantom.physics import ScannerPhysics
from LumbarBMDLib.phantom.render import (
    CONTRAST_PHASES,
    Enhancement,
    Rendered,
    Tissue,
    Variants,
    acquire,
    contrast_enhancement,
    make_grid,
    place_patient,
    render_bowel,
    render_calcification,
    render_canal,
    render_discs,
    render_metal,
    render_ribs,
    render_sacrum_and_pelvis,
    render_soft_tissue,
    render_vertebra,
    trabecular_hu,
)
from LumbarBMDLib.phantom.scanner import SCANNERS, VENDOR_PHYSICS, ScannerProfile, scanner_profile
from LumbarBMDLib.sagittal import (
    ANNOTATION_SLICES,
    mean_sagittal_image,
    sagittal_centre_yz,
    sagittal_geometry,
    sagittal_label_image,
)
from LumbarBMDLib.volume import CTVolume, atomic_folder, write_image

VARIANTS = (
    "none",
    "fracture",
    "implant",
    "partial-L1",
    "partial-L4",
    "six-lumbar",
    "contrast",
    "contrast-arterial",
    "contrast-portal-venous",
    "contrast-delayed",
    "low-dose",
    "scoliosis",
    "calcification",
    "mixed",
)
SIZES = ("full", "small")
#: variant name → contrast phase ("contrast" is the portal venous phase, the routine abdominal CT)
CONTRAST_VARIANTS = {"contrast": "portal_venous", "contrast-arterial": "arterial",
                     "contrast-portal-venous": "portal_venous", "contrast-delayed": "delayed"}
#: ``mixed``: pick[2] < 0.35 is enhanced; the interval is split arterial 20 %, portal venous 60 %, delayed 20 %
MIXED_PHASE_BOUNDS = ((0.07, "arterial"), (0.28, "portal_venous"), (0.35, "delayed"))

__all__ = ["CONTRAST_PHASES", "CONTRAST_VARIANTS", "SIZES", "VARIANTS", "PhantomCase", "generate_case",
           "generate_cohort", "make_variants", "write_case"]


@dataclass
class PhantomCase:
    """One generated case.

    Attributes:
        case_id: folder name, e.g. ``"A_000042"``.
        ct: the CT (int16 HU, axial LPS).
        labels: uint8 ``(nz, ny, nx)`` 3-D truth (1–4 = L1–L4 bodies, 5 L5, 6 L6, 11 T11, 12 T12, 20 sacrum,
            100 + value = posterior elements).
        tissue: uint8 ``(nz, ny, nx)`` tissue codes (:class:`~LumbarBMDLib.phantom.render.Tissue`), in memory only.
        truth: the truth.json content.
        annotation_image: float32 ``(512, 512)`` 20-slice mean sagittal image (HU) through the canal.
        annotation_labels: uint8 ``(512, 512)`` L1–L4 as an annotator draws them on that image.
        annotation_geometry: the sagittal grid of the annotation image (central plane).
        timings_s: seconds per step.
    """

    case_id: str
    ct: CTVolume
    labels: np.ndarray
    tissue: np.ndarray
    truth: dict
    annotation_image: np.ndarray
    annotation_labels: np.ndarray
    annotation_geometry: object
    timings_s: dict = field(default_factory=dict)


def make_variants(name: str, rng: np.random.Generator) -> Variants:
    """The :class:`Variants` for a variant name (``mixed`` draws a realistic mix).

    ``mixed`` draws exactly what it drew before the contrast phases existed (training cohorts depend on the stream):
    the phase is read from the same draw that decides contrast (:data:`MIXED_PHASE_BOUNDS`).
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}: choose one of {', '.join(VARIANTS)}")
    if name == "mixed":
        pick = rng.random(8)
        levels = ("L2", "L3", "L4", "L5")
        i = int(rng.integers(0, 3))
        return Variants(
            fracture=str(rng.choice(["L1", "L2", "L3"])) if pick[0] < 0.08 else None,
            implant_levels=(levels[i], levels[i + 1]) if pick[1] < 0.05 else (),
            contrast_phase=next((ph for bound, ph in MIXED_PHASE_BOUNDS if pick[2] < bound), None),
            calcification=bool(pick[3] < 0.3),
            scoliosis=bool(pick[4] < 0.1),
            six_lumbar=bool(pick[5] < 0.04),
            missing_level=("L1" if pick[7] < 0.5 else "L4") if pick[6] < 0.04 else None,
            low_dose=bool(rng.random() < 0.1),
        )
    return Variants(
        fracture=str(rng.choice(["L1", "L2", "L3"])) if name == "fracture" else None,
        implant_levels=("L4", "L5") if name == "implant" else (),
        contrast_phase=CONTRAST_VARIANTS.get(name),
        calcification=name == "calcification",
        scoliosis=name == "scoliosis",
        six_lumbar=name == "six-lumbar",
        missing_level={"partial-L1": "L1", "partial-L4": "L4"}.get(name),
        low_dose=name == "low-dose",
    )


def _canal_truth(rendered: Rendered) -> dict[int, list[float]]:
    """Per axial slice the centroid (LPS mm) of the canal contents (CSF + epidural fat), where ≥ 40 mm²."""
    g = rendered.grid
    mask = (rendered.tissue == Tissue.CSF) | (rendered.tissue == Tissue.EPIDURAL_FAT)
    min_voxels = 40.0 / (g.spacing[0] * g.spacing[1])
    out = {}
    for k in np.flatnonzero(mask.sum(axis=(1, 2)) >= min_voxels):
        jj, ii = np.nonzero(mask[k])
        out[int(k)] = [
            g.origin[0] + g.spacing[0] * float(ii.mean()),
            g.origin[1] + g.spacing[1] * float(jj.mean()),
            g.origin[2] + g.spacing[2] * float(k),
        ]
    return out


def _level_truth(patient: Patient, labels: np.ndarray, grid, scanner, variants: Variants,
                 enhancement: Enhancement | None = None) -> dict:
    """Per vertebra: BMD, category, centre (LPS), in-view fraction, trabecular HU, flags.

    With contrast, ``trabecular_hu`` includes the enhancement and ``trabecular_hu_unenhanced`` /
    ``trabecular_enhancement_hu`` give the HU without it and the difference.
    """
    out = {}
    counts = np.bincount(labels.ravel(), minlength=256)
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    for v in patient.vertebrae:
        full_ml = np.pi * v.width / 2 * v.depth / 2 * v.height * 0.93 / 1000.0
        seen_ml = counts[v.label] * voxel_ml
        out[v.name] = {
            "bmd_mg_cm3": round(v.bmd, 3),
            "category": category_of(v.bmd),
            "centre_lps": [round(float(c), 3) for c in v.centre],
            "in_view_fraction": round(float(min(1.0, seen_ml / full_ml)), 3),
            "trabecular_hu": round(trabecular_hu(v, scanner, enhancement), 2),
            **({} if enhancement is None else {
                "trabecular_hu_unenhanced": round(trabecular_hu(v, scanner, None), 2),
                "trabecular_enhancement_hu": round(enhancement.hu["spongiosa"], 2)}),
            "marrow_fat_fraction": round(v.marrow_fat, 4),
            "body_mm": {"width": round(v.width, 2), "depth": round(v.depth, 2), "height": round(v.height, 2)},
            "canal_mm": {"width": round(v.canal_width, 2), "depth": round(v.canal_depth, 2)},
            "fracture_wedge": round(v.wedge, 3),
            "implant": v.name in variants.implant_levels,
        }
    return out


def _scanner_for(vendor: str, scanner: ScannerPhysics | str | Path | None,
                 low_dose: bool) -> tuple[str, str, int, ScannerProfile, ScannerPhysics | None]:
    """``(vendor field, case-id prefix, noise key, profile, physics)`` of a vendor letter or a physical scanner."""
    if scanner is None:
        vendor = vendor.upper()
        if vendor not in SCANNERS:
            raise ValueError(f"unknown vendor {vendor!r}: choose one of {', '.join(SCANNERS)}")
        return vendor, vendor, "ABC".index(vendor), scanner_profile(vendor, low_dose=low_dose), None
    from LumbarBMDLib.phantom import physical_scanner as ps

    physics = ps.as_physics(scanner)
    profile = ps.profile_from_physics(physics)
    if low_dose:  # as scanner_profile: 2.5 × the noise (≈ 1/6 of the dose)
        profile = replace(profile, noise_sd=profile.noise_sd * 2.5)
    return ps.scanner_vendor(physics), ps.case_prefix(physics), ps.noise_key(physics), profile, physics


def generate_case(
    seed: int,
    vendor: str = "A",
    size: str = "full",
    variant: str | Variants = "none",
    category: str | None = None,
    scanner: ScannerPhysics | str | Path | None = None,
) -> PhantomCase:
    """Generate one phantom case in memory, deterministic by (seed, vendor or scanner, size, variant).

    Args:
        seed: the patient's seed (the same seed gives the same anatomy and BMD on every vendor).
        vendor: scanner profile "A" (training scanner), "B" or "C"; ignored when ``scanner`` is given.
        size: "full" (512², 0.6–0.9 mm, 1 mm slices) or "small" (192², 2 mm, 2.5 mm slices).
        variant: a name from :data:`VARIANTS` or a :class:`Variants`.
        category: force the BMD category ("osteoporosis", "osteopenia", "normal"); None draws from the cohort.
        scanner: a physically defined scanner (a :class:`~LumbarBMDLib.phantom.physics.ScannerPhysics` or the
            path of its JSON): the case is rendered with
            :func:`~LumbarBMDLib.phantom.physical_scanner.profile_from_physics`, its vendor is ``"P:<name>"``,
            its id ``P-<slug>_<seed>`` and its truth.json carries ``scanner_physics``. Needs the
            ``phantom-physics`` extra.
    """
    t0 = time.perf_counter()
    rng_variant = np.random.default_rng([seed, 1])
    variants = variant if isinstance(variant, Variants) else make_variants(variant, rng_variant)
    rng = np.random.default_rng([seed, 0])
    patient = sample_patient(
        rng,
        seed,
        category=category,
        scoliosis=variants.scoliosis,
        six_lumbar=variants.six_lumbar,
        fracture_level=variants.fracture,
    )
    place_patient(patient, rng)
    vendor, prefix, noise_key, scanner, physics = _scanner_for(vendor, scanner, variants.low_dose)
    grid = make_grid(patient, size, rng, variants.missing_level)
    # the bolus variation has its own stream: the anatomy of a contrast case is that of its unenhanced twin
    phase = variants.phase()
    enhancement = (None if phase is None
                   else contrast_enhancement(phase, scanner, np.random.default_rng([seed, 3])))
    timings = {"anatomy": time.perf_counter() - t0}

    t = time.perf_counter()
    hu, tissue = render_soft_tissue(patient, grid, scanner, variants, rng, enhancement)
    labels = np.zeros(grid.shape, np.uint8)
    render_bowel(hu, tissue, patient, grid, scanner, variants, rng, enhancement)
    render_canal(hu, tissue, patient, grid, scanner)
    render_discs(hu, tissue, patient, grid, scanner)
    for v in patient.vertebrae:
        render_vertebra(hu, labels, tissue, v, grid, scanner, variants, rng, enhancement)
    render_sacrum_and_pelvis(hu, labels, tissue, patient, grid, scanner, rng)
    render_ribs(hu, labels, tissue, patient, grid, scanner)
    if variants.calcification:
        render_calcification(hu, tissue, patient, grid, rng)
    metal = render_metal(hu, tissue, patient, grid, variants.implant_levels) if variants.implant_levels else None
    rendered = Rendered(hu=hu, labels=labels, tissue=tissue, grid=grid, metal=metal)
    timings["render"] = time.perf_counter() - t

    t = time.perf_counter()
    rng_scan = np.random.default_rng([seed, 2, noise_key])
    ct_hu = acquire(hu, grid, scanner, patient.body_ry, metal, rng_scan)
    del hu
    timings["acquire"] = time.perf_counter() - t

    t = time.perf_counter()
    ct = CTVolume(
        hu=ct_hu,
        spacing=grid.spacing,
        origin=grid.origin,
        source=f"phantom seed {seed} vendor {vendor}",
        # the tube voltage a DICOM header would carry (the NIfTI written by write_case cannot: read back, it has none)
        metadata={"phantom": True, "kvp": float((physics if physics is not None else VENDOR_PHYSICS[vendor]).kvp)},
    )
    canal = _canal_truth(rendered)
    canal_pts = np.array(list(canal.values()))
    sag_x = float(canal_pts[:, 0].mean())
    geom = sagittal_geometry(ct, sag_x, ANNOTATION_SLICES, sagittal_centre_yz(ct, canal_pts))
    ann_image = mean_sagittal_image(ct, geom)
    ann_labels = sagittal_label_image(CTVolume(hu=labels, spacing=grid.spacing, origin=grid.origin), geom)
    timings["annotation"] = time.perf_counter() - t

    levels = _level_truth(patient, labels, grid, scanner, variants, enhancement)
    bmd = {n: levels[n]["bmd_mg_cm3"] for n in LUMBAR_LEVELS}
    in_view = [n for n in LUMBAR_LEVELS if levels[n]["in_view_fraction"] >= 0.5]
    case_id = f"{prefix}_{seed:06d}"
    truth = {
        "case": case_id,
        "bmd_mg_cm3": bmd,
        "mean_bmd_mg_cm3": round(float(np.mean(list(bmd.values()))), 3),
        "category": category_of(float(np.mean(list(bmd.values())))),
        "vendor": vendor,
        "seed": int(seed),
        "size": size,
        "levels_in_view": in_view,
        "levels": levels,
        "variants": variants.flags(),
        **({} if enhancement is None else {"contrast": _contrast_truth(enhancement, scanner)}),
        "patient": {
            "age": round(patient.age, 1),
            "sex": patient.sex,
            "abdomen_ap_mm": round(2 * patient.body_ry, 1),
            "abdomen_lr_mm": round(2 * patient.body_rx, 1),
            "lordosis_deg": round(patient.lordosis_deg, 2),
            "sacral_slope_deg": round(patient.sacral_slope_deg, 2),
            "scoliosis_mm": round(patient.scoliosis_mm, 2),
        },
        "scanner": scanner.as_dict(),
        "scanner_physics": _vendor_physics_truth(vendor) if physics is None else _physics_truth(physics),
        "grid": {"shape_zyx": list(grid.shape), "spacing_xyz_mm": list(grid.spacing), "origin_lps": list(grid.origin)},
        "canal": {
            "centres_lps": [[round(c, 3) for c in p] for p in canal.values()],
            "slice_indices": list(canal.keys()),
            "mean_centre_lps": [round(float(c), 3) for c in canal_pts.mean(axis=0)],
            "sagittal_x_lps": round(sag_x, 3),
            "drift_x_mm": round(float(np.ptp(canal_pts[:, 0])), 3),
        },
        "annotation": {
            "slices": ANNOTATION_SLICES,
            "pixel_mm": geom.pixel_mm,
            "step_mm": geom.step_mm,
            "levels_drawn": [n for i, n in enumerate(LUMBAR_LEVELS, 1) if (ann_labels == i).any()],
        },
        "label_values": {
            **{("sacrum" if name == "S" else name): value for name, value in BODY_LABELS.items()},
            "posterior_elements": f"{POSTERIOR_OFFSET} + body value",
        },
    }
    timings["total"] = time.perf_counter() - t0
    return PhantomCase(
        case_id=case_id,
        ct=ct,
        labels=labels,
        tissue=tissue,
        truth=truth,
        annotation_image=ann_image,
        annotation_labels=ann_labels,
        annotation_geometry=geom.central_plane(),
        timings_s=timings,
    )


def _vendor_physics_truth(vendor: str) -> dict:
    """truth.json's ``scanner_physics`` of vendor A, B or C (without computing spectra: no optional extra needed)."""
    from LumbarBMDLib.phantom.scanner import VENDOR_EFFECTIVE_ENERGY_KEV, VENDOR_PHYSICS

    return {**VENDOR_PHYSICS[vendor].as_dict(), "effective_energy_kev": VENDOR_EFFECTIVE_ENERGY_KEV[vendor]}


def _contrast_truth(enhancement: Enhancement, scanner: ScannerProfile) -> dict:
    """truth.json ``contrast``: phase, bolus factor, iodine and HU enhancement per compartment, the painted HU."""
    e = enhancement.hu
    painted = {
        "aorta": scanner.blood_hu + e["aorta"], "ivc": scanner.blood_hu + e["ivc"],
        "portal_vein": scanner.blood_hu + e["portal_vein"], "liver": scanner.liver_hu + e["liver"],
        "spleen": scanner.liver_hu - 10.0 + e["spleen"], "kidney": scanner.kidney_hu + e["kidney"],
    }
    return {**enhancement.as_json(), "hu": {k: round(v, 2) for k, v in painted.items()}}


def _physics_truth(physics: ScannerPhysics) -> dict:
    from LumbarBMDLib.phantom.physical_scanner import physics_truth

    return physics_truth(physics)


def write_case(case: PhantomCase, out_dir: str | Path) -> Path:
    """Write a case to ``out_dir/<case_id>/`` atomically (a temporary folder renamed at the end).

    Files: ``ct.nii.gz`` (int16 HU), ``vertebrae.nii.gz`` (uint8 labels), ``truth.json``,
    ``annotation_image.nii.gz`` (float32 HU, 20-slice mean sagittal image, overlays the CT) and
    ``annotation_labels.nii.gz`` (uint8 L1–L4 on that image). Returns the case folder.
    """
    final = Path(out_dir) / case.case_id
    with atomic_folder(final) as tmp:
        write_image(case.ct.to_sitk(np.int16), tmp / "ct.nii.gz")
        write_image(replace(case.ct, hu=case.labels).to_sitk(), tmp / "vertebrae.nii.gz")
        geom = case.annotation_geometry
        write_image(geom.to_sitk(case.annotation_image.astype(np.float32)), tmp / "annotation_image.nii.gz")
        write_image(geom.to_sitk(case.annotation_labels.astype(np.uint8)), tmp / "annotation_labels.nii.gz")
        (tmp / "truth.json").write_text(json.dumps(case.truth, indent=1), encoding="utf-8")
    return final


COHORT_COLUMNS = [
    "case",
    "seed",
    "vendor",
    "size",
    "age",
    "sex",
    "mean_bmd_mg_cm3",
    "category",
    "L1",
    "L2",
    "L3",
    "L4",
    "levels_in_view",
    "variants",
]


def cohort_row(truth: dict) -> dict:
    """One cohort.csv row of a case's truth."""
    flags = truth["variants"]
    active = [k for k, v in flags.items() if v not in (None, False, [], ()) and k != "contrast_phase"]
    if flags.get("contrast_phase") not in (None, "portal_venous"):  # "contrast" alone is the portal venous phase
        active.insert(active.index("contrast") + 1, flags["contrast_phase"])
    return {
        "case": truth["case"],
        "seed": truth["seed"],
        "vendor": truth["vendor"],
        "size": truth["size"],
        "age": truth["patient"]["age"],
        "sex": truth["patient"]["sex"],
        "mean_bmd_mg_cm3": truth["mean_bmd_mg_cm3"],
        "category": truth["category"],
        **{n: truth["bmd_mg_cm3"][n] for n in LUMBAR_LEVELS},
        "levels_in_view": " ".join(truth["levels_in_view"]),
        "variants": " ".join(active) or "none",
    }


def generate_cohort(
    out_dir: str | Path,
    cases: int = 10,
    seed: int = 0,
    vendor: str = "A",
    size: str = "full",
    variant: str = "none",
    progress: bool = True,
    scanner: ScannerPhysics | str | Path | None = None,
) -> Path:
    """Generate ``cases`` cases with seeds ``seed … seed + cases − 1`` and write ``out_dir/cohort.csv``.

    Cases already present (with their truth.json) are kept and not generated again, so an interrupted
    cohort resumes. ``scanner``: a physically defined scanner instead of ``vendor`` (see :func:`generate_case`).
    Returns the path of cohort.csv.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    physics = None
    vendor, prefix = vendor.upper(), vendor.upper()
    if scanner is not None:
        from LumbarBMDLib.phantom import physical_scanner as ps

        physics = ps.as_physics(scanner)
        vendor, prefix = ps.scanner_vendor(physics), ps.case_prefix(physics)
    rows = []
    for s in tqdm(range(seed, seed + cases), desc=f"phantom {vendor}", unit="case", disable=not progress):
        truth_path = out_dir / f"{prefix}_{s:06d}" / "truth.json"
        if truth_path.exists():
            truth = json.loads(truth_path.read_text(encoding="utf-8"))
            # a case of another scanner definition (e.g. a vendor before issue 15 made A, B, C physical) is redone
            expected = (physics if physics is not None else VENDOR_PHYSICS[vendor]).as_dict()
            same_physics = {k: v for k, v in truth.get("scanner_physics", {}).items() if k in expected} == expected
            if truth.get("size") == size and truth.get("vendor") == vendor and same_physics:
                rows.append(cohort_row(truth))
                continue
        case = generate_case(s, vendor, size, variant, scanner=physics)
        write_case(case, out_dir)
        rows.append(cohort_row(case.truth))
    csv_path = out_dir / "cohort.csv"
    existing = []
    if csv_path.exists():  # keep rows of other vendors/seeds written earlier into the same folder
        with csv_path.open(newline="", encoding="utf-8") as f:
            existing = [r for r in csv.DictReader(f) if r["case"] not in {row["case"] for row in rows}]
    tmp = csv_path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COHORT_COLUMNS)
        writer.writeheader()
        writer.writerows(sorted(existing + rows, key=lambda r: r["case"]))
    os.replace(tmp, csv_path)
    return csv_path
