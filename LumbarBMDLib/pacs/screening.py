"""A screening batch over a PACS (``lumbarbmd run --pacs``): the studies a query finds become the batch's inputs,
named by their Study Instance UID, with their provenance in results.json; studies that could not be fetched become
failed cases with their sentence; measured cases' DICOM SEG and SR are sent back into their study on request.

The measuring itself is :func:`LumbarBMDLib.batch.run_batch` (in this process or on Dask), unchanged: this module
only turns a query into inputs before it and sends results after it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from LumbarBMDLib.batch import CaseOutcome, _safe, failed_results, read_previous, write_case_outputs
from LumbarBMDLib.durable import atomic_write_text, case_lock
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.pacs.fetch import pacs_inputs, send_back
from LumbarBMDLib.pacs.server import parse_server

#: Default download cache, inside the output folder (hidden: summary.csv lists only case folders).
DEFAULT_CACHE = ".pacs-cache"


@dataclass
class StudyInputs:
    """What a PACS query gives the batch.

    Attributes:
        inputs: the chosen series' local folders, one per fetched study (the batch's INPUTs).
        extras: per input (absolute path), ``{"pacs": provenance}`` for its results.json.
        names: per input (absolute path), its case id: the Study Instance UID.
        failed: ``(case id, provenance)`` of the studies that could not be fetched (provenance["error"] says why).
    """

    inputs: list[Path] = field(default_factory=list)
    extras: dict[str, dict] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    failed: list[tuple[str, dict]] = field(default_factory=list)


def study_inputs(server_spec: str, query: dict, cache_dir: str | Path, refresh: bool = False) -> StudyInputs:
    """Query the PACS, choose and fetch one series per study (:func:`~LumbarBMDLib.pacs.fetch.pacs_inputs`).

    Raises LumbarBMDError (one sentence) for a bad address or query, an unreachable PACS, no matching study."""
    out = StudyInputs()
    for folder, provenance in pacs_inputs(server_spec, query, cache_dir, refresh=refresh):
        case_id = _safe(provenance.get("study_instance_uid") or "unknown-study")
        if folder is None:
            out.failed.append((case_id, provenance))
            continue
        key = os.path.abspath(folder)
        out.inputs.append(Path(key))
        out.extras[key] = {"pacs": provenance}
        out.names[key] = case_id
    return out


def record_failed_studies(out_dir: str | Path, failed: list[tuple[str, dict]]) -> list[CaseOutcome]:
    """A failed case folder per study that could not be fetched, with its sentence and provenance; a study measured
    by an earlier run keeps its results (the note says the fetch failed this time)."""
    out_dir = Path(out_dir)
    outcomes = []
    for case_id, provenance in failed:
        folder = out_dir / case_id
        source = f"pacs study {provenance.get('study_instance_uid')} on {provenance.get('server')}"
        with case_lock(out_dir, case_id):
            previous, _ = read_previous(folder)
            if previous is not None and previous.get("status") in ("ok", "partial"):
                outcomes.append(CaseOutcome(case_id, folder, previous, skipped=True,
                                            note=f"fetching it again failed ({provenance['error']}); the earlier "
                                                 "result is kept"))
                continue
            results = failed_results(source, provenance["error"])
            results.update({"case_id": case_id, "pacs": provenance})
            write_case_outputs(folder, results, None)
        outcomes.append(CaseOutcome(case_id, folder, results))
    return outcomes


def send_case_outputs(out_dir: str | Path, outcomes: list[CaseOutcome], server_spec: str) -> list[str]:
    """Send each measured case's DICOM SEG and SR to ``server_spec`` (STOW-RS or C-STORE) and record it in its
    results.json (``dicom_outputs.sent_to``, ``sent_sop_instance_uids``; ``send_error`` when it failed). A case
    already sent there by an earlier run is not sent again, so a rerun finishes an interrupted send.

    Returns one line per case sent or failed, for the console."""
    out_dir = Path(out_dir)
    target = parse_server(server_spec).describe()
    lines = []
    for outcome in outcomes:
        with case_lock(out_dir, outcome.case):
            results, _ = read_previous(outcome.folder)
            dicom = (results or {}).get("dicom_outputs") or {}
            if results is None or results.get("status") == "failed" or not dicom.get("files"):
                continue
            if dicom.get("sent_to") == target:
                continue
            try:
                uids = send_back(server_spec, [outcome.folder / name for name in dicom["files"]])
            except LumbarBMDError as err:
                dicom["send_error"] = str(err)
                lines.append(f"{outcome.case}: the DICOM results could not be sent to {target}: {err}")
            else:
                dicom.pop("send_error", None)
                dicom.update(sent_to=target, sent_sop_instance_uids=uids)
                lines.append(f"{outcome.case}: {', '.join(dicom['files'])} sent to {target}")
            results["dicom_outputs"] = dicom
            atomic_write_text(outcome.folder / "results.json", json.dumps(results, indent=1))
    return lines
