"""``lumbarbmd run``: the whole method over a batch of CT files and DICOM folders.

Per case, ``DIR/<case id>/`` receives (DESIGN.md contract) ``results.json``, ``results.csv`` (one row per level),
``sagittal.nii.gz`` (the mean of the 10 candidate slices, on the plane of the labels) and
``sagittal_labels.nii.gz`` (L1–L4; both overlay the CT in any viewer) and ``report.html``; a failed case gets
only ``results.json`` with ``"status": "failed"`` and the error. ``DIR/summary.csv`` lists every case in ``DIR``
and is rewritten (atomically) after each case.

**Case identity.** The case id comes from what identifies the scan: the input's path relative to the batch's
common folder (``DATA/A_000020/ct.nii.gz`` → ``A_000020``: a file name that every input shares, or a generic one
such as ``ct`` or ``image``, says nothing, so the folder names the case). ``results.json`` records the id, the
input and the sha256 of its content. A case folder that holds **another** input (a different sha256, a damaged
``results.json``, or a file or link in its place) is never overwritten: the new input is written as
``<id>_<first 8 hex digits of its sha256>`` and the summary's ``note`` says so.

**Durability** (``LumbarBMDLib.durable``): every case folder is filled in a hidden temporary sibling and exchanged
into place, so it is complete or absent (never half-written, never missing while replaced); one lock per case makes
two processes writing into one folder take turns (the second finds the case done); temporary folders of a
process that died are removed on the next run; the output folder is checked to be writable before any work.

Models are loaded once per batch; one failing case never stops the others; cases already finished (ok or
partial) with the same input content are skipped unless ``force``; failed cases are tried again.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from LumbarBMDLib import __version__
from LumbarBMDLib._compat import zip_strict
from LumbarBMDLib.durable import (
    TMP_MARK,
    atomic_folder,
    atomic_write_text,
    case_lock,
    check_writable_folder,
    clean_stale_temporaries,
)
from LumbarBMDLib.errors import LumbarBMDError

if TYPE_CHECKING:  # the heavy stages (torch, MONAI, SciPy) are imported where a case is measured, not on import
    from LumbarBMDLib.calibration import ScannerCalibration
    from LumbarBMDLib.pipeline import CaseResult
    from LumbarBMDLib.regression import RegressionModel
    from LumbarBMDLib.segmentation import SegmentationModel

SUMMARY_COLUMNS = ["case", "input", "status", "mean_bmd_mg_cm3", "category", "L1", "L2", "L3", "L4", "missing",
                   "error", "total_s", "input_sha256", "note"]
LEVEL_COLUMNS = ["level", "found", "bmd_mg_cm3", "category", "confidence", "centre_x_lps", "centre_y_lps",
                 "centre_z_lps", "reason"]
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
GENERIC_NAMES = frozenset({"ct", "image", "img", "volume", "vol", "scan", "series", "data", "input", "dicom", "dcm",
                           "study", "images", "original", "ct_image", "ctimage"})  # a file called so names no one
SUMMARY_LOCK = ".summary"  # the lock that serialises rewriting summary.csv
DIGEST_CHARS = 8  # hex digits of the sha256 appended to a case id already taken by another input (1 in 4·10⁹)


@dataclass
class CaseOutcome:
    """What happened to one input: its case id, folder, results.json object, whether it was skipped, and a note
    (e.g. why it got another id)."""

    case: str
    folder: Path
    results: dict
    skipped: bool = False
    note: str = ""


def _stem(path: Path) -> str:
    name = path.name
    for ext in IMAGE_ENDINGS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _safe(name: str) -> str:
    """A folder name from any text: letters, digits, ``.``, ``_``, ``-`` (no leading dot: never hidden or ``..``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".") or "case"


def case_ids(paths: list[Path]) -> list[str]:
    """Case ids for a batch of inputs, from their paths relative to the batch's common folder.

    The last part (the file name without its image ending, or the DICOM folder's name) is left out when every
    input of a batch of several shares it, or when it is a generic name (``ct``, ``image``, ``dicom`` …): then the
    folders name the cases. Ids are not made unique here: two inputs with one id are told apart by their content
    when written (:func:`resolve_case_folder`).
    """
    if not paths:
        return []
    parts = [[*Path(os.path.abspath(p)).parts[:-1], _stem(Path(p))] for p in paths]
    last = {q[-1] for q in parts}
    drop = [(len(paths) > 1 and len(last) == 1) or q[-1].lower() in GENERIC_NAMES for q in parts]
    keys = [q[:-1] if d and len(q) > 1 else q for q, d in zip_strict(parts, drop)]
    common = os.path.commonpath([os.path.join(*k) for k in keys]) if len(keys) > 1 else None
    ids = []
    for k in keys:
        if common is not None:
            rel = Path(os.path.relpath(os.path.join(*k), common)).parts
            rel = [r for r in rel if r not in (".", "")]
        else:
            rel = []
        ids.append(_safe("_".join(rel) if rel else k[-1]))
    return ids


def named_jobs(paths: list[Path], names: dict[str, str] | None = None) -> list[tuple[Path, str]]:
    """``(path, case id)`` per input: :func:`case_ids`, except for the inputs ``names`` (keyed by absolute path)
    names itself (a PACS study is named by its Study Instance UID, not by its cache folder)."""
    given = {os.path.abspath(Path(k).expanduser()): _safe(v) for k, v in (names or {}).items()}
    return [(p, given.get(os.path.abspath(p), c)) for p, c in zip_strict(paths, case_ids(paths))]


def input_digest(path: Path) -> str | None:
    """sha256 of an input's content: a file's bytes, or a folder's regular files (relative names and bytes, in
    sorted order); None for anything else (a device, a FIFO: the reader refuses them)."""
    from LumbarBMDLib.weights import sha256_of

    try:
        if path.is_file():
            return sha256_of(path)
        if path.is_dir():
            h = hashlib.sha256()
            for f in sorted(q for q in path.rglob("*") if q.is_file()):
                h.update(str(f.relative_to(path)).encode("utf-8", "surrogateescape") + b"\0")
                h.update(bytes.fromhex(sha256_of(f)))
            return h.hexdigest()
    except OSError:
        return None  # unreadable: read_ct says why
    return None


def read_previous(folder: Path) -> tuple[dict | None, str]:
    """A case folder's results.json, or None and why it cannot be used (absent, damaged, not an object)."""
    f = folder / "results.json"
    if not f.is_file():
        return None, "it has no results.json"
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, "its results.json is damaged"
    if not isinstance(obj, dict):
        return None, "its results.json is damaged"
    return obj, ""


def _same_input(previous: dict, source: str, digest: str | None) -> bool:
    if previous.get("input_sha256") and digest:
        return previous["input_sha256"] == digest
    return previous.get("input") == source  # a result of an earlier version (no sha256): the same path


def resolve_case_folder(out_dir: Path, case_id: str, source: str, digest: str | None
                        ) -> tuple[str, dict | None, str]:
    """Where an input is written: ``(case id, its previous results.json if it is this input's, note)``.

    ``out_dir/case_id`` is used when it is free or holds this input; otherwise the input gets
    ``<case_id>_<sha8>`` and the note says which input holds the id.
    """
    folder = out_dir / case_id
    if not folder.exists() and not folder.is_symlink():
        return case_id, None, ""
    if folder.is_symlink() or not folder.is_dir():
        why = f"{folder} is a {'symbolic link' if folder.is_symlink() else 'file'}, not a case folder"
    else:
        previous, problem = read_previous(folder)
        if previous is not None and _same_input(previous, source, digest):
            return case_id, previous, ""
        if previous is None and problem == "it has no results.json" and not any(folder.iterdir()):
            return case_id, None, ""  # an empty folder (made by hand): nothing to lose
        why = (f"the case id {case_id} already holds another input ({previous.get('input')})" if previous is not None
               else f"the case folder {folder} cannot be checked ({problem})")
    if digest is None:
        raise LumbarBMDError(f"{why}; this input cannot be told apart from it (its content could not be read), "
                             "so nothing was written: use another output folder")
    other = f"{case_id}_{digest[:DIGEST_CHARS]}"
    note = f"{why}; left untouched, this input is written as {other}"
    folder = out_dir / other
    if not folder.exists() and not folder.is_symlink():
        return other, None, note
    previous, _ = read_previous(folder) if folder.is_dir() and not folder.is_symlink() else (None, "")
    if previous is not None and _same_input(previous, source, digest):
        return other, previous, note
    raise LumbarBMDError(f"{why}, and {folder} holds yet another; nothing was written: use another output folder")


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


def write_case_outputs(folder: Path, results: dict, result: CaseResult | None,
                       dicom_source: Path | None = None) -> None:
    """Write a case's files into ``folder`` via a temporary sibling folder put in place at the end (atomic).

    ``dicom_source``: the input, when DICOM outputs were asked for (``run --dicom``): the SEG and SR
    (:func:`LumbarBMDLib.dicom.outputs.write_dicom_outputs`) go into the same folder, and results.json says which
    files (``dicom_outputs.files``) or why there are none (``dicom_outputs.error``: a NIfTI input, a changed
    series); the measurement stands either way."""
    from LumbarBMDLib.report import render_report
    from LumbarBMDLib.volume import write_image

    with atomic_folder(folder) as tmp:
        if result is not None:
            if dicom_source is not None:
                results["dicom_outputs"] = dicom_outputs_into(tmp, Path(dicom_source), result, results)
            geom = result.label_geometry
            mean_image = result.annotation.images.candidates_hu.mean(axis=0).astype(np.float32)
            write_image(geom.to_sitk(mean_image), tmp / "sagittal.nii.gz")
            write_image(geom.to_sitk(result.labels.astype(np.uint8)), tmp / "sagittal_labels.nii.gz")
            _results_csv(tmp / "results.csv", results)
            (tmp / "report.html").write_text(render_report(results, result), encoding="utf-8")
        _write_json(tmp / "results.json", results)


def dicom_outputs_into(folder: Path, source: Path, result: CaseResult, results: dict) -> dict:
    """Write the case's DICOM SEG and SR into ``folder``: ``{"files": [...]}``, or ``{"error": sentence}`` when
    they cannot be made (the input is not a DICOM series, the archive extra is missing, …)."""
    try:
        from LumbarBMDLib.dicom.outputs import write_dicom_outputs

        written = write_dicom_outputs(folder, source, result, results)
    except ImportError as err:
        return {"error": f"DICOM SEG and SR need highdicom ({err.name} is not installed): "
                         'pip install "lumbarbmd[archive]"'}
    except LumbarBMDError as err:
        return {"error": str(err)}
    return {"files": [p.name for p in written]}


def failed_results(source: str, error: str, timings: dict | None = None) -> dict:
    """The results.json object of a failed case."""
    return {"input": source, "status": "failed", "error": error, "vertebrae": [], "mean_bmd_mg_cm3": None,
            "category": None, "canal": None, "timings_s": {k: round(v, 3) for k, v in (timings or {}).items()},
            "models": None, "version": __version__}


def failure_sentence(err: BaseException, path: Path) -> str | None:
    """The sentence for a failure that is not a :class:`LumbarBMDError` but still expected (memory, the file
    system, ITK's allocation errors); None for a programming error, which must stay visible."""
    if isinstance(err, MemoryError):
        return "out of memory while processing this CT"
    if isinstance(err, RuntimeError) and ("alloc" in str(err).lower() or "memory" in str(err).lower()):
        return "out of memory while processing this CT (the image library could not allocate its buffers)"
    if isinstance(err, OSError):
        where = err.filename or path
        return f"could not read or write {where}: {err.strerror or err}"
    return None


def apply_scanner_spec(volume, spec) -> None:
    """Put a site's scanner description (a :class:`~LumbarBMDLib.phantom.physics.ScannerPhysics`, ``--scanner-spec``)
    into ``volume.metadata`` for the internal calibration: its equivalent filtration always, its kVp only when the
    image carries none (a NIfTI; the DICOM tag wins)."""
    if spec is None:
        return
    volume.metadata["filtration_mm_al"] = float(spec.filtration_mm_al)
    volume.metadata["filtration_mm_cu"] = float(spec.filtration_mm_cu)
    if volume.metadata.get("kvp") is None:
        volume.metadata["kvp"] = float(spec.kvp)
        volume.metadata["kvp_source"] = "scanner spec"


def run_case(path: Path, folder: Path, seg_model: SegmentationModel, bmd_model: RegressionModel,
             calibration: ScannerCalibration | None, identity: dict | None = None, scanner_spec=None,
             dicom_out: bool = False, ahead: ReadAhead | None = None) -> dict:
    """Measure one input and write its folder; returns its results.json object (never raises for a bad input).

    ``identity`` (``case_id``, ``input_sha256``, and e.g. the PACS provenance) is recorded in results.json;
    ``scanner_spec``: the site's scanner description (:func:`apply_scanner_spec`); ``dicom_out``: also write the
    DICOM SEG and SR (:func:`write_case_outputs`); ``ahead``: this input being read already (:func:`read_ahead`;
    another input's is ignored). ``timings_s``: ``load`` (reading), ``total`` (reading and the method: the
    pipeline's own time, without the models' loading or the case's files)."""
    from LumbarBMDLib.pipeline import measure, results_json

    t0 = time.perf_counter()
    try:
        if ahead is not None and ahead.path == path:
            volume, load = ahead.result()  # raises what reading it raised
        else:
            volume = read_for_case(path, scanner_spec)
            load = time.perf_counter() - t0
        result = measure(volume, seg_model, bmd_model, calibration)
        results = results_json(result, str(path), seg_model, bmd_model, {"load": load,
                                                                         "total": load + result.timings_s["total"]})
    except LumbarBMDError as err:
        result, results = None, failed_results(str(path), str(err), {"total": time.perf_counter() - t0})
    except (MemoryError, RuntimeError, OSError) as err:
        sentence = failure_sentence(err, path)
        if sentence is None:
            raise
        result, results = None, failed_results(str(path), sentence, {"total": time.perf_counter() - t0})
    results.update(identity or {})
    try:
        write_case_outputs(folder, results, result, path if dicom_out else None)
    except OSError as err:  # a full disk, a folder made read-only meanwhile: nothing half-written remains
        raise LumbarBMDError(f"could not write the case folder {folder}: {err.strerror or err}") from None
    return results


def read_for_case(path: Path, scanner_spec=None):
    """:func:`~LumbarBMDLib.volume.read_ct` of one input, with the site's scanner description applied."""
    from LumbarBMDLib.volume import read_ct

    volume = read_ct(path)
    apply_scanner_spec(volume, scanner_spec)
    return volume


class ReadAhead:
    """One input read on a background thread (:func:`read_ahead`), while the command imports torch and MONAI and
    loads the models.

    Why: a fresh ``lumbarbmd run`` spends about 3 s importing torch, MONAI and SciPy and loading the two models
    before its first case can start (on the 2-core development machine, against about 5 s for the case itself).
    Reading a CT is GIL-free work (SimpleITK's readers and zlib inflation release the GIL), so it runs on the other
    core meanwhile: a fresh process for one full case takes 8.76 s instead of 9.60 s (means of 6 alternating runs).
    Only the read moves: the canal and spine stages are GIL-bound Python and NumPy; run beside the imports as well,
    the process was no faster within the noise, and the case's stage times came out inflated. The input's lock, its
    folder and whether it is done already are decided later, as for any case; a volume it turns out not to need is
    dropped."""

    def __init__(self, path: Path, scanner_spec=None):
        import threading
        from concurrent.futures import Future

        self.path = path
        self._future: Future = Future()
        self._thread = threading.Thread(target=self._work, args=(scanner_spec,), name="lumbarbmd-read-ahead",
                                        daemon=True)  # a command that fails meanwhile exits without waiting for it
        self._thread.start()

    def _work(self, scanner_spec) -> None:
        t0 = time.perf_counter()
        try:
            volume = read_for_case(self.path, scanner_spec)
            self._future.set_result((volume, time.perf_counter() - t0))
        except BaseException as err:  # handed to the case, which turns a bad input into its sentence as always
            self._future.set_exception(err)

    def result(self):
        """``(volume, seconds reading it)``; raises what :func:`read_for_case` raised."""
        return self._future.result()


def read_ahead(path: Path, out_dir: Path, case_id: str, force: bool, scanner_spec=None) -> ReadAhead | None:
    """Start :class:`ReadAhead` for ``path``, unless its case folder already says it is done (ok or partial, not
    ``force``: a resumed batch does not read a finished case for nothing; :func:`in_case_folder` still decides under
    the case's lock). What reading imports is imported here first, on this thread, so that the two threads never
    import the same module at once."""
    import pydicom  # noqa: F401  (read_ct of a DICOM folder)

    import LumbarBMDLib.volume  # noqa: F401

    previous, _ = read_previous(out_dir / case_id)
    if not force and previous is not None and previous.get("status") in ("ok", "partial"):
        return None
    return ReadAhead(path, scanner_spec)


def summary_row(case: str, results: dict, note: str = "") -> dict:
    """One row of summary.csv."""
    levels = {v["level"]: v for v in results.get("vertebrae", []) if isinstance(v, dict) and "level" in v}
    return {"case": case, "input": results.get("input"), "status": results.get("status"),
            "mean_bmd_mg_cm3": results.get("mean_bmd_mg_cm3"), "category": results.get("category"),
            **{lv: (levels[lv].get("bmd_mg_cm3") if lv in levels else None) for lv in ("L1", "L2", "L3", "L4")},
            "missing": " ".join(lv for lv, v in levels.items() if not v.get("found")),
            "error": results.get("error") or "", "total_s": (results.get("timings_s") or {}).get("total"),
            "input_sha256": results.get("input_sha256") or "", "note": note or results.get("note") or ""}


def write_summary(out_dir: Path, notes: dict[str, str] | None = None,
                  cache: dict[str, tuple[int, dict]] | None = None) -> Path:
    """``DIR/summary.csv``: one row per case folder in ``DIR`` (this batch's and earlier ones'), rewritten
    atomically under a lock so that two processes writing into one folder never lose each other's rows.

    ``cache`` (``{case: (results.json mtime in ns, row)}``, kept by the caller between calls) spares re-reading the
    results.json of cases unchanged since the last call: a batch rewrites the summary after every case."""
    out_dir = Path(out_dir)
    cache = {} if cache is None else cache
    with case_lock(out_dir, SUMMARY_LOCK):
        for stale in out_dir.glob(f".summary.csv{TMP_MARK}*"):  # of a writer killed mid-write (we hold the lock)
            with contextlib.suppress(OSError):
                if stale.is_file() and not stale.is_symlink():
                    stale.unlink()
        rows = []
        for folder in sorted(p for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                mtime = (folder / "results.json").stat().st_mtime_ns
            except OSError:
                mtime = -1
            note = (notes or {}).get(folder.name, "")
            if folder.name in cache and cache[folder.name][0] == mtime and mtime >= 0:
                rows.append(dict(cache[folder.name][1], note=note or cache[folder.name][1]["note"]))
                continue
            previous, problem = read_previous(folder)
            if previous is None:
                if problem != "it has no results.json":
                    rows.append({"case": folder.name, "status": "unknown", "error": f"{folder.name}: {problem}"})
                continue
            row = summary_row(folder.name, previous, note)
            cache[folder.name] = (mtime, row)
            rows.append(row)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
        return atomic_write_text(out_dir / "summary.csv", buf.getvalue())


def run_batch(inputs: list[str | Path], out_dir: str | Path, device: str = "auto", force: bool = False,
              calibration: ScannerCalibration | None = None, seg_model_path: str | Path | None = None,
              bmd_model_path: str | Path | None = None, progress: bool = True,
              allow_unverified: bool = False, scanner_spec=None, *, scheduler: str | None = None,
              threads_per_worker: int | None = None, retries: int | None = None, dicom_out: bool = False,
              extras: dict[str, dict] | None = None, names: dict[str, str] | None = None) -> list[CaseOutcome]:
    """Run every input; returns the outcomes in input order (see the module docstring). ``allow_unverified``
    accepts models whose card has no sha256 (recorded in results.json as ``models_verified``); ``scanner_spec``:
    the site's scanner description for the internal calibration (:func:`apply_scanner_spec`).

    ``scheduler`` (``"local"``, ``"local:N"`` or a Dask scheduler address such as ``"tcp://host:8786"``) runs the
    cases on Dask workers (:mod:`LumbarBMDLib.distributed`: ``threads_per_worker``, ``retries``); None (the
    default) runs them here, one after the other. Both run every case through :func:`_run_one`, so the case
    folders, the locks, resume and summary.csv are the same."""
    out_dir = check_writable_folder(out_dir)
    summary = out_dir / "summary.csv"
    if summary.exists() and not summary.is_file():
        raise LumbarBMDError(f"{summary} exists and is not a file; move it away")
    clean_stale_temporaries(out_dir)
    # per-case options, forwarded as keywords to _run_one both here and on Dask workers: a new per-case option
    # (e.g. a DICOM output folder) is one more entry here and one more keyword of _run_one / run_case
    options = {"calibration": calibration, "force": force, "scanner_spec": scanner_spec, "dicom_out": dicom_out,
               "extras": {os.path.abspath(Path(k).expanduser()): v for k, v in (extras or {}).items()}}
    if scheduler is not None:
        from LumbarBMDLib.distributed import ModelSpec, run_distributed

        paths = [Path(os.path.abspath(Path(raw).expanduser())) for raw in inputs]  # workers have their own cwd
        return run_distributed(scheduler, named_jobs(paths, names), out_dir,
                               ModelSpec.of(seg_model_path, bmd_model_path, device, allow_unverified), options,
                               progress=progress, threads_per_worker=threads_per_worker, retries=retries)
    from tqdm import tqdm

    paths = [Path(raw).expanduser() for raw in inputs]
    jobs = named_jobs(paths, names)
    # the first case is read while torch, MONAI and the models load
    ahead = read_ahead(jobs[0][0], out_dir, jobs[0][1], force, scanner_spec) if jobs else None
    with imports_without_gc():
        import monai.networks.nets  # noqa: F401  (DenseNet-121: what RegressionModel.load builds)

        import LumbarBMDLib.pipeline
        import LumbarBMDLib.report  # noqa: F401
        from LumbarBMDLib.regression import RegressionModel
        from LumbarBMDLib.segmentation import SegmentationModel

    seg_model = SegmentationModel.load(seg_model_path, device=device, allow_unverified=allow_unverified)
    bmd_model = RegressionModel.load(bmd_model_path, device=device, allow_unverified=allow_unverified)
    outcomes = []
    notes: dict[str, str] = {}
    summary_cache: dict[str, tuple[int, dict]] = {}
    for path, case_id in tqdm(jobs, desc="cases", unit="case", disable=not progress):
        outcome = _run_one(path, case_id, out_dir, seg_model, bmd_model, ahead=ahead, **options)
        ahead = None  # its volume is no longer held
        if outcome.note:
            notes[outcome.case] = outcome.note
        outcomes.append(outcome)
        write_summary(out_dir, notes, summary_cache)  # after every case: a batch stopped half-way still has its summary
    return outcomes


@contextlib.contextmanager
def imports_without_gc():
    """Import the heavy stages (torch, MONAI, SciPy: about 10⁶ objects) with the cyclic garbage collector paused:
    it would otherwise traverse them over and over while they are made (about 0.7 s of CPU; nothing else changes)."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _run_one(path: Path, case_id: str, out_dir: Path, seg_model: SegmentationModel, bmd_model: RegressionModel,
             calibration: ScannerCalibration | None = None, force: bool = False, scanner_spec=None,
             dicom_out: bool = False, extras: dict[str, dict] | None = None,
             ahead: ReadAhead | None = None) -> CaseOutcome:
    """One input, under the lock of its case id (a second process on the same case waits, then finds it done).

    ``extras``: per input (keyed by its absolute path), fields added to its results.json (the PACS provenance);
    ``ahead``: this input being read already (:func:`read_ahead`).

    The one implementation of a case: the in-process batch and the Dask workers
    (:func:`LumbarBMDLib.distributed.case_task`) both call it."""
    def measure_into(folder: Path, identity: dict) -> dict:
        identity.update((extras or {}).get(os.path.abspath(path), {}))
        return run_case(path, folder, seg_model, bmd_model, calibration, identity, scanner_spec, dicom_out, ahead)

    return in_case_folder(path, case_id, out_dir, measure_into, force)


def in_case_folder(path: Path, case_id: str, out_dir: Path, work, force: bool = False) -> CaseOutcome:
    """Run ``work(folder, identity) -> results`` for one input in its case folder: under the case's lock, in the
    folder :func:`resolve_case_folder` gives it (never another input's), unless it is finished already (ok or
    partial, and not ``force``). ``identity`` holds ``case_id``, ``input_sha256`` and the folder's note; a
    :class:`LumbarBMDError` from ``work`` (the folder could not be written) is the case's failure, the batch goes on.
    """
    source = str(path)
    digest = input_digest(path)
    with case_lock(out_dir, case_id):
        try:
            final_id, previous, note = resolve_case_folder(out_dir, case_id, source, digest)
        except LumbarBMDError as err:  # nowhere to write this input without touching another's results
            return CaseOutcome(case_id, out_dir / case_id, failed_results(source, str(err)), note=str(err))
        folder = out_dir / final_id
        with case_lock(out_dir, final_id) if final_id != case_id else contextlib.nullcontext():
            if previous is not None and previous.get("status") in ("ok", "partial") and not force:
                return CaseOutcome(final_id, folder, previous, skipped=True, note=note)
            identity = {"case_id": final_id, "input_sha256": digest}
            if note:
                identity["note"] = note
            try:
                results = work(folder, identity)
            except LumbarBMDError as err:  # the folder could not be written: the case is lost, the batch goes on
                return CaseOutcome(final_id, folder, failed_results(source, str(err)), note=str(err))
            return CaseOutcome(final_id, folder, results, note=note)
