"""DICOMweb side of the PACS client: QIDO-RS queries, WADO-RS retrieval and STOW-RS storage through
:class:`dicomweb_client.DICOMwebClient`. Every network failure becomes a :class:`LumbarBMDError` sentence."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset

from LumbarBMDLib.dicom.files import save_dicom_file
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.pacs.query import (
    IMAGE_LEVEL_KEYS,
    SERIES_RETURN_KEYS,
    STUDY_RETURN_KEYS,
    SeriesInfo,
    StudyInfo,
    StudyQuery,
    dataset_from_json,
    folder_name,
    series_from_dataset,
    study_from_dataset,
    text,
    with_instance_details,
)
from LumbarBMDLib.pacs.server import PacsServer

log = logging.getLogger(__name__)
ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)  # WADO-RS: the files as stored, no transcoding
RETRY_ATTEMPTS = 3
RETRY_WAIT_MS = 250  # exponential: 0.5 s, then 1 s
PAGE = 500  # QIDO-RS answers asked for per request (servers that page their answers are followed page by page)


def _all_pages(search, uid_keyword: str, **kwargs) -> list[dict]:
    """Every answer of a QIDO-RS search, ``PAGE`` at a time (``limit``/``offset``); stops on a short page or on a
    page that brings nothing new (a server that ignores ``offset``)."""
    answers: list[dict] = []
    seen: set[str] = set()
    offset = 0
    while True:
        page = search(limit=PAGE, offset=offset, **kwargs) or []
        new = [a for a in page if _uid_of(a, uid_keyword) not in seen]
        seen.update(_uid_of(a, uid_keyword) for a in new)
        answers += new
        if len(page) < PAGE or not new:
            return answers
        offset += len(page)


def _uid_of(answer: dict, keyword: str) -> str:
    return text(dataset_from_json(answer), keyword)


class _WildcardSession(requests.Session):
    """A session that sends QIDO-RS wildcards as ``*``, not ``%2A``: ``*`` is allowed in a URL query (RFC 3986
    sub-delims), and some servers (Orthanc's DICOMweb plugin 1.7) match nothing with ``%2A``."""

    def request(self, method, url, *args, **kwargs):  # type: ignore[override]
        base, sep, query = str(url).partition("?")
        return super().request(method, base + sep + query.replace("%2A", "*").replace("%2a", "*"), *args, **kwargs)


def _client(server: PacsServer) -> DICOMwebClient:
    session = _WildcardSession()
    if server.username:
        session.auth = (server.username, server.password)
    client = DICOMwebClient(server.url, session=session, timeout=server.timeout_s)
    # Retry a busy server (429, 503, 504) and a dropped connection a little, not for half a minute.
    client.set_http_retry_params(retry=True, max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=RETRY_WAIT_MS)
    return client


@contextlib.contextmanager
def _sentences(server: PacsServer, doing: str) -> Iterator[None]:
    """Turn the HTTP/network failures of the block into one sentence naming the server and the operation."""
    try:
        yield
    except requests.exceptions.HTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        hint = {401: " (the PACS wants a user name and password: https://user:password@host/…)",
                403: " (the PACS refuses this user)",
                404: " (is the DICOMweb base URL right, e.g. http://host:8042/dicom-web?)"}.get(status, "")
        raise LumbarBMDError(f"the PACS at {server.describe()} answered HTTP {status} to {doing}{hint}") from None
    except requests.exceptions.Timeout:
        raise LumbarBMDError(f"the PACS at {server.describe()} did not answer within {server.timeout_s:g} s to "
                             f"{doing}") from None
    except requests.exceptions.ConnectionError:
        raise LumbarBMDError(f"could not reach the PACS at {server.describe()} for {doing}: no connection (is the "
                             "server running, and are the host and port right?)") from None
    except requests.exceptions.RequestException as err:
        raise LumbarBMDError(f"could not reach the PACS at {server.describe()} for {doing}: "
                             f"{type(err).__name__} ({err})") from None


def find_studies(server: PacsServer, query: StudyQuery) -> list[StudyInfo]:
    """QIDO-RS ``/studies`` with the query's matching keys."""
    keys = query.matching_keys()
    name = keys.get("PatientName", "")
    if "^" in name:  # Orthanc's DICOMweb plugin 1.7 matches no name with a ``^`` (%5E): ask wider, filter here
        keys["PatientName"] = name.replace("^", "*")
    with _sentences(server, "a study query (QIDO-RS)"):
        answers = _all_pages(_client(server).search_for_studies, "StudyInstanceUID",
                             search_filters=keys, fields=list(STUDY_RETURN_KEYS))
    studies = [study_from_dataset(dataset_from_json(a)) for a in answers]
    return [s for s in studies if name_matches(s.patient_name, name)] if "^" in name else studies


def name_matches(name: str, pattern: str) -> bool:
    """DICOM person-name matching of ``name`` against ``pattern`` (``*`` any characters, ``?`` one; case-insensitive
    as most archives do)."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.upper())
    return re.fullmatch(regex, name.upper()) is not None


def find_series(server: PacsServer, study_uid: str) -> list[SeriesInfo]:
    """QIDO-RS ``/studies/{uid}/series``; the image-level attributes the series answer lacks are read from one
    instance's metadata (WADO-RS ``…/instances/{uid}/metadata``)."""
    client = _client(server)
    with _sentences(server, f"a series query (QIDO-RS) of study {study_uid}"):
        answers = _all_pages(client.search_for_series, "SeriesInstanceUID", study_instance_uid=study_uid,
                             fields=list(SERIES_RETURN_KEYS + IMAGE_LEVEL_KEYS))
    series = [series_from_dataset(dataset_from_json(a), study_uid) for a in answers]
    return [complete_from_instance(server, s, client) if s.needs_instance_details() else s for s in series]


def complete_from_instance(server: PacsServer, series: SeriesInfo, client=None) -> SeriesInfo:
    """``series`` completed with the image-level attributes of one of its instances (QIDO-RS for one instance,
    then WADO-RS metadata); unchanged when the series has no instance."""
    client = client or _client(server)
    with _sentences(server, f"the metadata of one instance of series {series.series_uid}"):
        count = None
        if series.n_instances is None:  # the series answer lacked it: count the instances
            instances = _all_pages(client.search_for_instances, "SOPInstanceUID", study_instance_uid=series.study_uid,
                                   series_instance_uid=series.series_uid, fields=["SOPInstanceUID"])
            count = len(instances)
        else:
            instances = client.search_for_instances(study_instance_uid=series.study_uid,
                                                    series_instance_uid=series.series_uid, limit=1,
                                                    fields=["SOPInstanceUID"])
        if not instances:
            return series
        sop = text(dataset_from_json(instances[0]), "SOPInstanceUID")
        meta = client.retrieve_instance_metadata(series.study_uid, series.series_uid, sop)
    return with_instance_details(series, dataset_from_json(meta), n_instances=count)


def retrieve_series(server: PacsServer, study_uid: str, series_uid: str, folder: Path) -> list[Path]:
    """WADO-RS retrieval of one series into ``folder`` as ``<SOPInstanceUID>.dcm`` files, as stored on the PACS
    (transfer syntax ``*``); the instances are written one by one as they arrive."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    client = _client(server)
    with _sentences(server, f"the retrieval (WADO-RS) of series {series_uid}"):
        try:
            instances = client.iter_series(study_uid, series_uid, media_types=ANY_TRANSFER_SYNTAX)
            first = next(instances, None)
        except requests.exceptions.HTTPError as err:
            if err.response is None or err.response.status_code not in (400, 406):
                raise
            # A server that cannot send "as stored" (transfer-syntax=*): its default, explicit VR little endian.
            instances = client.iter_series(study_uid, series_uid)
            first = next(instances, None)
        if first is not None:
            for ds in _chain(first, instances):
                path = folder / f"{_file_stem(ds)}.dcm"
                save_dicom_file(ds, path)
                written.append(path)
    return written


def _chain(first: Dataset, rest: Iterator[Dataset]) -> Iterator[Dataset]:
    yield first
    yield from rest


def _file_stem(ds: Dataset) -> str:
    return folder_name(text(ds, "SOPInstanceUID"))


def store_files(server: PacsServer, paths: list[Path]) -> list[str]:
    """STOW-RS of DICOM files (grouped by study); returns the SOP Instance UIDs the PACS accepted, or raises a
    sentence listing the ones it refused."""
    by_study: dict[str, list[Dataset]] = {}
    for p in paths:
        ds = pydicom.dcmread(p)
        by_study.setdefault(text(ds, "StudyInstanceUID"), []).append(ds)
    client = _client(server)
    stored: list[str] = []
    for study_uid, datasets in by_study.items():
        with _sentences(server, f"storing {len(datasets)} file(s) (STOW-RS) in study {study_uid}"):
            answer = client.store_instances(datasets, study_instance_uid=study_uid or None)
        failed = [text(item, "ReferencedSOPInstanceUID") for item in answer.get("FailedSOPSequence", [])]
        if failed:
            raise LumbarBMDError(f"the PACS at {server.describe()} refused {len(failed)} of {len(datasets)} file(s) "
                                 f"(STOW-RS), e.g. SOP instance {failed[0]}")
        stored += [text(item, "ReferencedSOPInstanceUID") for item in answer.get("ReferencedSOPSequence", [])]
    return stored
