"""Studies from a PACS into a local cache, resumable: :func:`fetch_studies`, and results back: :func:`send_files`.

Layout: ``cache_dir/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` plus
``cache_dir/<StudyInstanceUID>/pacs.json``, the completion marker (what was chosen and why, the files and their
sizes, the server). UIDs are unique by construction, so no two studies or series share a folder.

- A study folder is filled as a hidden temporary sibling and put in place in one step
  (:func:`LumbarBMDLib.durable.atomic_folder`) with the marker written last: a study folder is complete or absent.
- A study whose marker is present and whose files all exist with their recorded sizes is not downloaded again (no
  request beyond the study query); anything else (no marker, a missing or truncated file, another series chosen
  before) is downloaded again, completely.
- One study's failure (no acceptable series, a refused retrieval, fewer images than announced) gives that study
  an error sentence; the next study is fetched all the same.
- Two processes fetching into one cache serialise per study (:func:`LumbarBMDLib.durable.case_lock`); the
  temporary folders of a killed fetch are removed at the next start.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import pydicom

from LumbarBMDLib import durable
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.pacs import client
from LumbarBMDLib.pacs.query import SeriesInfo, StudyInfo, StudyQuery, folder_name, text
from LumbarBMDLib.pacs.selection import choose_series
from LumbarBMDLib.pacs.server import PacsServer, parse_server

log = logging.getLogger(__name__)
MARKER = "pacs.json"
MARKER_VERSION = 1


@dataclass(frozen=True)
class FetchedStudy:
    """One study of a fetch: the local folder of its chosen series (None when it failed), the choice sentences,
    and where it came from. ``from_cache``: it was complete already and nothing was downloaded."""

    study: StudyInfo
    server: str
    series: SeriesInfo | None = None
    series_folder: Path | None = None
    choice: str = ""
    reasons: tuple[str, ...] = ()
    error: str = ""
    from_cache: bool = False
    n_files: int = 0
    retrieved_with: str = ""
    query: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the series folder is there to be measured."""
        return self.series_folder is not None and not self.error

    def provenance(self) -> dict:
        """Plain data for results.json: server, UIDs, the choice and its reasons, the error (None when fine)."""
        return {
            "source": "pacs",
            "server": self.server,
            "query": dict(self.query),
            "study_instance_uid": self.study.study_uid,
            "series_instance_uid": self.series.series_uid if self.series else None,
            "patient_id": self.study.patient_id,
            "accession_number": self.study.accession_number,
            "study_date": self.study.study_date,
            "series_description": self.series.description if self.series else None,
            "series_choice": self.choice,
            "series_reasons": list(self.reasons),
            "retrieved_with": self.retrieved_with,
            "from_cache": self.from_cache,
            "n_files": self.n_files,
            "folder": str(self.series_folder) if self.series_folder else None,
            "error": self.error or None,
        }


def _method(server: PacsServer) -> str:
    return "WADO-RS" if server.protocol == "dicomweb" else ("C-MOVE" if server.retrieve == "move" else "C-GET")


def study_folder(cache_dir: Path, study_uid: str) -> Path:
    """The cache folder of one study."""
    return Path(cache_dir) / folder_name(study_uid)


def read_marker(folder: Path) -> dict | None:
    """The completion marker of a study folder when the download is complete (every recorded file present with its
    recorded size), else None."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        files = marker["files"]
        series_dir = folder / folder_name(marker["series_instance_uid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if marker.get("version") != MARKER_VERSION or not files:
        return None
    for name, size in files.items():
        p = series_dir / name
        try:
            if p.stat().st_size != size:
                return None
        except OSError:
            return None
    return marker


def _check_files(paths: list[Path], series: SeriesInfo) -> None:
    """Every retrieved file belongs to the series, and as many as the PACS announced arrived."""
    if not paths:
        raise LumbarBMDError(f"the PACS sent no image of {series.label()}")
    if series.n_instances is not None and len(paths) != series.n_instances:
        raise LumbarBMDError(f"the PACS sent {len(paths)} of the {series.n_instances} images of {series.label()}; "
                             "the study will be downloaded again at the next run")
    for p in paths:
        uid = text(pydicom.dcmread(p, stop_before_pixels=True), "SeriesInstanceUID")
        if uid != series.series_uid:
            raise LumbarBMDError(f"the PACS sent an image of series {uid} for {series.label()}")


def _from_marker(study: StudyInfo, server: PacsServer, folder: Path, marker: dict, query: dict) -> FetchedStudy:
    known = {f.name for f in fields(SeriesInfo)}
    series = SeriesInfo(**{k: (tuple(v) if k in ("image_type", "orientation") and v is not None else v)
                           for k, v in marker["series"].items() if k in known})
    return FetchedStudy(study=study, server=server.describe(), series=series,
                        series_folder=folder / folder_name(marker["series_instance_uid"]), choice=marker["choice"],
                        reasons=tuple(marker["reasons"]), from_cache=True, n_files=len(marker["files"]),
                        retrieved_with=marker.get("retrieved_with", ""), query=query)


def fetch_study(server: PacsServer, study: StudyInfo, cache_dir: Path, query: dict | None = None,
                refresh: bool = False, **choice_options) -> FetchedStudy:
    """Fetch one study's chosen series into ``cache_dir`` (or find it complete there); raises a sentence on
    failure (see :func:`fetch_studies`, which does not)."""
    query = dict(query or {})
    folder = study_folder(cache_dir, study.study_uid)
    with durable.case_lock(cache_dir, folder.name):
        marker = None if refresh else read_marker(folder)
        if marker is not None:
            log.info("study %s: complete in %s, not downloaded again", study.study_uid, folder)
            return _from_marker(study, server, folder, marker, query)
        series_list = client.find_series(server, study.study_uid)
        choice = choose_series(series_list, **choice_options)
        if choice.chosen is None:
            raise LumbarBMDError(f"study {study.study_uid} ({study.study_date or 'no date'}): {choice.sentence}")
        chosen = choice.chosen
        started = time.time()
        with durable.atomic_folder(folder) as tmp:
            paths = client.retrieve_series(server, chosen, tmp / folder_name(chosen.series_uid))
            _check_files(paths, chosen)
            marker = {
                "version": MARKER_VERSION,
                "server": server.describe(),
                "query": query,
                "study": {"study_uid": study.study_uid, "patient_id": study.patient_id, "study_date": study.study_date,
                          "accession_number": study.accession_number},
                "series_instance_uid": chosen.series_uid,
                "series": chosen.as_dict(),
                "choice": choice.sentence,
                "reasons": choice.reasons_list(),
                "retrieved_with": _method(server),
                "retrieved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(time.time() - started, 3),
                "files": {p.name: p.stat().st_size for p in sorted(paths)},
            }
            durable.atomic_write_text(tmp / MARKER, json.dumps(marker, indent=1))  # the marker comes last
        log.info("study %s: %d images of %s retrieved with %s", study.study_uid, len(paths), chosen.label(),
                 _method(server))
        return FetchedStudy(study=study, server=server.describe(), series=chosen,
                            series_folder=folder / folder_name(chosen.series_uid), choice=choice.sentence,
                            reasons=tuple(choice.reasons_list()), n_files=len(paths), retrieved_with=_method(server),
                            query=query)


def _as_server(server: PacsServer | str) -> PacsServer:
    return parse_server(server) if isinstance(server, str) else server


def _as_query(query: StudyQuery | dict) -> StudyQuery:
    return StudyQuery.from_dict(query) if isinstance(query, dict) else query


def fetch_studies(server: PacsServer | str, query: StudyQuery | dict, cache_dir: str | Path,
                  refresh: bool = False, **choice_options) -> list[FetchedStudy]:
    """Query the PACS and fetch the chosen series of every matching study into ``cache_dir``.

    A study already complete in the cache is not downloaded again (``refresh=True`` downloads it anyway); a partial
    one is downloaded again; a study that fails is returned with its ``error`` sentence and the others go on. A
    failing study query (PACS unreachable, refused) raises :class:`LumbarBMDError`. ``choice_options`` go to
    :func:`~LumbarBMDLib.pacs.selection.choose_series` (``min_coverage_mm``, ``axial_tolerance_deg``).
    """
    server, query = _as_server(server), _as_query(query)
    cache_dir = durable.check_writable_folder(cache_dir, "PACS cache folder")
    durable.clean_stale_temporaries(cache_dir)
    studies = client.find_studies(server, query)
    out = []
    for study in studies:
        try:
            out.append(fetch_study(server, study, cache_dir, query.as_dict(), refresh, **choice_options))
        except Exception as err:  # one study's failure never stops the others
            sentence = str(err) if isinstance(err, LumbarBMDError) else (
                f"study {study.study_uid} could not be fetched: {type(err).__name__}: {err}")
            log.warning("%s", sentence)
            out.append(FetchedStudy(study=study, server=server.describe(), error=sentence,
                                    retrieved_with=_method(server), query=query.as_dict()))
    return out


def send_files(server: PacsServer | str, paths: list[str | Path]) -> list[str]:
    """Send DICOM files (e.g. the SEG and SR of a result) to the PACS with STOW-RS or C-STORE; returns the SOP
    Instance UIDs stored. A file that is missing or not DICOM is refused before anything is sent."""
    server = _as_server(server)
    files = [Path(p) for p in paths]
    for p in files:
        try:
            pydicom.dcmread(p, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as err:
            raise LumbarBMDError(f"cannot send {p} to the PACS: it is missing or not a DICOM file ({err})") from None
    return client.store_files(server, files)


def pacs_inputs(server_spec: str, query: dict, cache_dir: str | Path,
                refresh: bool = False) -> list[tuple[Path | None, dict]]:
    """For the batch: ``(series folder, provenance)`` per matching study, ready for ``read_ct``/``run_batch``.

    A study that could not be fetched comes with ``None`` and its sentence in ``provenance["error"]`` (write it as a
    failed case). Raises :class:`LumbarBMDError` when the query is malformed, the PACS cannot be queried, or no
    study matches.
    """
    server, study_query = parse_server(server_spec), StudyQuery.from_dict(query)
    fetched = fetch_studies(server, study_query, cache_dir, refresh=refresh)
    if not fetched:
        criteria = ", ".join(f"{k}={v}" for k, v in study_query.matching_keys().items())
        raise LumbarBMDError(f"no study on the PACS at {server.describe()} matches {criteria}")
    return [(f.series_folder if f.ok else None, f.provenance()) for f in fetched]


def send_back(server_spec: str, paths: list[str | Path]) -> list[str]:
    """Send result files (DICOM SEG/SR) to the PACS named by ``server_spec``; the SOP Instance UIDs stored."""
    return send_files(parse_server(server_spec), paths)
