"""``lumbarbmd run``: the whole method over a batch of CT files and DICOM folders.

Per case, ``DIR/<case>/`` receives (DESIGN.md contract) ``results.json``, ``results.csv`` (one row per level),
``sagittal.nii.gz`` (the mean of the 10 candidate slices, on the plane of the labels) and
``sagittal_labels.nii.gz`` (L1–L4; both overlay the CT in any viewer) and ``report.html``; a failed case gets
only ``results.json`` with ``"status": "failed"`` and the error. Every case folder is written in a temporary
folder and renamed when complete, so no half-written case is ever left. ``DIR/summary.csv`` lists the batch.

Models are loaded once per batch; one failing case never stops the others; cases already finished (ok or
partial) are skipped unless ``force``; failed cases are tried again.
"""

from __future__ import annotations

import csv
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from LumbarBMDLib import __version__
from LumbarBMDLib.calibration import ScannerCalibration
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.pipeline import CaseResult, measure, results_json
from LumbarBMDLib.regression import RegressionModel
from LumbarBMDLib.report import render_report
from LumbarBMDLib.segmentation import SegmentationModel
from LumbarBMDLib.volume import atomic_folder, read_ct, write_csv, write_image

SUMMARY_COLUMNS = ["case", "input", "status", "mean_bmd_mg_cm3", "category", "L1", "L2", "L3", "L4", "missing",
                   "error", "total_s"]
LEVEL_COLUMNS = ["level", "found", "bmd_mg_cm3", "category", "confidence", "centre_x_lps", "centre_y_lps",
                 "centre_z_lps", "reason"]


@dataclass
class CaseOutcome:
    """What happened to one input: its case name, folder, results.json object, and whether it was skipped."""

    case: str
    folder: Path
    results: dict
    skipped: bool = False


def case_name(path: Path, taken: set[str]) -> str:
    """Folder name for an input: the file name without its image extension (or the DICOM folder's name), made
    unique within the batch."""
    name = path.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "case"
    unique, k = name, 2
    while unique in taken:
        unique, k = f"{name}_{k}", k + 1
    taken.add(unique)
    return unique


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


def _results_csv(path: Path, results: dict) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=LEVEL_COLUMNS)
        writer.writeheader()
        for v in results["vertebrae"]:
            centre = v.get("centre_lps") or [None, None, None]
            writer.writerow({"level": v["level"], "found": v["found"], "bmd_mg_cm3": v.get("bmd_mg_cm3"),
                             "category": v.get("category"), "confidence": v.get("confidence"),
                             "centre_x_lps": centre[0], "centre_y_lps": centre[1], "centre_z_lps": centre[2],
                             "reason": v.get("reason", "")})


def write_case_outputs(folder: Path, results: dict, result: CaseResult | None) -> None:
    """Write a case's files into ``folder`` via a temporary sibling folder renamed at the end (atomic)."""
    with atomic_folder(folder) as tmp:
        if result is not None:
            geom = result.label_geometry
            mean_image = result.annotation.images.candidates_hu.mean(axis=0).astype(np.float32)
            write_image(geom.to_sitk(mean_image), tmp / "sagittal.nii.gz")
            write_image(geom.to_sitk(result.labels.astype(np.uint8)), tmp / "sagittal_labels.nii.gz")
            _results_csv(tmp / "results.csv", results)
            (tmp / "report.html").write_text(render_report(results, result), encoding="utf-8")
        _write_json(tmp / "results.json", results)


def failed_results(source: str, error: str, timings: dict | None = None) -> dict:
    """The results.json object of a failed case."""
    return {"input": source, "status": "failed", "error": error, "vertebrae": [], "mean_bmd_mg_cm3": None,
            "category": None, "canal": None, "timings_s": {k: round(v, 3) for k, v in (timings or {}).items()},
            "models": None, "version": __version__}


def run_case(path: Path, folder: Path, seg_model: SegmentationModel, bmd_model: RegressionModel,
             calibration: ScannerCalibration | None) -> dict:
    """Measure one input and write its folder; returns its results.json object (never raises LumbarBMDError)."""
    t0 = time.perf_counter()
    try:
        volume = read_ct(path)
        load = time.perf_counter() - t0
        result = measure(volume, seg_model, bmd_model, calibration)
        results = results_json(result, str(path), seg_model, bmd_model, {"load": load,
                                                                         "total": time.perf_counter() - t0})
        write_case_outputs(folder, results, result)
    except LumbarBMDError as err:
        results = failed_results(str(path), str(err), {"total": time.perf_counter() - t0})
        write_case_outputs(folder, results, None)
    except MemoryError:
        results = failed_results(str(path), "out of memory while processing this CT", {})
        write_case_outputs(folder, results, None)
    return results


def summary_row(case: str, results: dict) -> dict:
    """One row of summary.csv."""
    levels = {v["level"]: v for v in results.get("vertebrae", [])}
    return {"case": case, "input": results.get("input"), "status": results.get("status"),
            "mean_bmd_mg_cm3": results.get("mean_bmd_mg_cm3"), "category": results.get("category"),
            **{lv: (levels[lv].get("bmd_mg_cm3") if lv in levels else None) for lv in ("L1", "L2", "L3", "L4")},
            "missing": " ".join(lv for lv, v in levels.items() if not v["found"]),
            "error": results.get("error") or "", "total_s": results.get("timings_s", {}).get("total")}


def write_summary(out_dir: Path, outcomes: list[CaseOutcome]) -> Path:
    """``DIR/summary.csv`` over the batch (atomic)."""
    return write_csv(out_dir / "summary.csv", SUMMARY_COLUMNS, (summary_row(o.case, o.results) for o in outcomes))


def run_batch(inputs: list[str | Path], out_dir: str | Path, device: str = "auto", force: bool = False,
              calibration: ScannerCalibration | None = None, seg_model_path: str | Path | None = None,
              bmd_model_path: str | Path | None = None, progress: bool = True) -> list[CaseOutcome]:
    """Run every input; returns the outcomes in input order (see the module docstring)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seg_model = SegmentationModel.load(seg_model_path, device=device)
    bmd_model = RegressionModel.load(bmd_model_path, device=device)
    taken: set[str] = set()
    outcomes = []
    for raw in tqdm(inputs, desc="cases", unit="case", disable=not progress):
        path = Path(raw)
        case = case_name(path, taken)
        folder = out_dir / case
        done = folder / "results.json"
        if done.is_file() and not force:
            previous = json.loads(done.read_text(encoding="utf-8"))
            if previous.get("status") in ("ok", "partial") and previous.get("input") == str(path):
                outcomes.append(CaseOutcome(case, folder, previous, skipped=True))
                continue
        outcomes.append(CaseOutcome(case, folder, run_case(path, folder, seg_model, bmd_model, calibration)))
    write_summary(out_dir, outcomes)
    return outcomes
