"""The PACS client: one set of functions for both protocols (DICOMweb or DIMSE, from the :class:`PacsServer`).

- :func:`find_studies` — studies matching a :class:`~LumbarBMDLib.pacs.query.StudyQuery` (QIDO-RS or C-FIND);
- :func:`find_series` — a study's series with the attributes the series choice needs (one instance's metadata
  fills what the series-level answer lacks);
- :func:`retrieve_series` — one series into a local folder (WADO-RS, C-GET or C-MOVE);
- :func:`store_files` — DICOM files to the PACS (STOW-RS or C-STORE).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.pacs.query import SeriesInfo, StudyInfo, StudyQuery
from LumbarBMDLib.pacs.server import PacsServer

_PACKAGES = {"dicomweb": "dicomweb-client (and requests)", "dimse": "pynetdicom"}


def _impl(server: PacsServer):
    """The protocol module, imported when first needed: without the ``archive`` extra, a sentence says what to
    install (the rest of LumbarBMD works without it)."""
    name = "dicomweb" if server.protocol == "dicomweb" else "dimse"
    try:
        return importlib.import_module(f"LumbarBMDLib.pacs.{name}")
    except ModuleNotFoundError as err:
        raise LumbarBMDError(f"reading from a PACS over {'DICOMweb' if name == 'dicomweb' else 'DIMSE'} needs "
                             f"{_PACKAGES[name]}, which is not installed ({err.name}): "
                             "pip install 'lumbarbmd[archive]'") from None


def find_studies(server: PacsServer, query: StudyQuery) -> list[StudyInfo]:
    """Studies matching ``query``, sorted by date then UID (the PACS's order is not stable)."""
    found = {s.study_uid: s for s in _impl(server).find_studies(server, query) if s.study_uid}
    return sorted(found.values(), key=lambda s: (s.study_date, s.study_uid))


def find_series(server: PacsServer, study_uid: str) -> list[SeriesInfo]:
    """The series of one study, sorted by series number then UID."""
    series = [s for s in _impl(server).find_series(server, study_uid) if s.series_uid]
    return sorted(series, key=lambda s: (s.series_number is None, s.series_number or 0, s.series_uid))


def retrieve_series(server: PacsServer, series: SeriesInfo, folder: Path) -> list[Path]:
    """Retrieve ``series`` into ``folder`` (``<SOPInstanceUID>.dcm`` files); returns the files written."""
    impl = _impl(server)
    if server.protocol == "dicomweb":
        return impl.retrieve_series(server, series.study_uid, series.series_uid, folder)
    return impl.retrieve_series(server, series.study_uid, series.series_uid, folder,
                                [series.sop_class_uid] if series.sop_class_uid else None)


def store_files(server: PacsServer, paths: list[Path]) -> list[str]:
    """Send DICOM files to the PACS; returns the SOP Instance UIDs it stored."""
    return _impl(server).store_files(server, [Path(p) for p in paths]) if paths else []
