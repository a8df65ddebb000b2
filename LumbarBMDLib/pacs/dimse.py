"""DIMSE side of the PACS client (pynetdicom, Study Root): C-FIND queries, C-GET or C-MOVE retrieval, C-STORE.

C-GET needs nothing but the PACS's address: the PACS sends the images back over our own association (we propose the
storage SOP classes with the SCP role). C-MOVE needs the PACS to know our AE title with our host and ``store_port``;
a storage SCP is started on that port for the time of the retrieval. Every failure becomes a :class:`LumbarBMDError`
sentence.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
from pydicom import uid as uids
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.pacs.query import (
    IMAGE_LEVEL_KEYS,
    SERIES_RETURN_KEYS,
    STUDY_RETURN_KEYS,
    SeriesInfo,
    StudyInfo,
    StudyQuery,
    folder_name,
    series_from_dataset,
    study_from_dataset,
    text,
    with_instance_details,
)
from LumbarBMDLib.pacs.server import PacsServer

#: Transfer syntaxes we accept for retrieved images: uncompressed first, then the usual lossless/lossy encodings, so
#: that the PACS can send its files as stored (pydicom decodes them when read).
TRANSFER_SYNTAXES = [uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian, uids.DeflatedExplicitVRLittleEndian,
                     uids.JPEGLosslessSV1, uids.JPEGLossless, uids.JPEGLSLossless, uids.JPEG2000Lossless,
                     uids.RLELossless, uids.JPEGBaseline8Bit, uids.JPEGExtended12Bit, uids.JPEGLSNearLossless,
                     uids.JPEG2000]
PENDING = (0xFF00, 0xFF01)
SUCCESS_OR_WARNING = (0x0000, 0x0001, 0xB000, 0xB006, 0xB007)
MAX_CONTEXTS = 128


def _ae(server: PacsServer) -> AE:
    ae = AE(ae_title=server.calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = server.timeout_s
    ae.maximum_pdu_size = 0  # no limit on what we receive
    return ae


@contextlib.contextmanager
def _association(server: PacsServer, ae: AE, doing: str, **kwargs) -> Iterator:
    """An established association with the PACS for the block (released afterwards), or a sentence saying why not."""
    assoc = ae.associate(server.host, server.port, ae_title=server.called_aet, **kwargs)
    if not assoc.is_established:
        if assoc.is_rejected:
            why = (f"it rejected the association; the PACS must know our AE title {server.calling_aet} and the called "
                   f"AE title must be {server.called_aet}")
        else:
            why = (f"no DICOM answer at {server.host}:{server.port} (is the PACS running, and are the host and the "
                   "DICOM port right?)")
        raise LumbarBMDError(f"could not open a DICOM association with the PACS at {server.describe()} for {doing}: "
                             f"{why}")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _status_text(status: Dataset | None) -> str:
    if status is None or "Status" not in status:
        return "no answer (timeout or aborted association)"
    comment = f", {status.ErrorComment}" if "ErrorComment" in status else ""
    return f"status 0x{int(status.Status):04X}{comment}"


@contextlib.contextmanager
def _find_association(server: PacsServer, doing: str) -> Iterator:
    ae = _ae(server)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    with _association(server, ae, doing) as assoc:
        yield assoc


def _c_find(server: PacsServer, identifier: Dataset, doing: str, assoc=None) -> list[Dataset]:
    """The answers of one C-FIND, over ``assoc`` when given (else a new association)."""
    if assoc is None:
        with _find_association(server, doing) as own:
            return _c_find(server, identifier, doing, own)
    answers = []
    for status, ident in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        code = int(status.Status) if status is not None and "Status" in status else None
        if code in PENDING:
            if ident is not None:
                answers.append(ident)
        elif code == 0x0000:
            break
        else:
            raise LumbarBMDError(f"the PACS at {server.describe()} failed {doing} (C-FIND): "
                                 f"{_status_text(status)}; does it allow queries from our AE title "
                                 f"{server.calling_aet}?")
    return answers


def _identifier(level: str, matching: dict[str, str], returned: tuple[str, ...]) -> Dataset:
    ds = Dataset()
    if any(not v.isascii() for v in matching.values()):
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, for names with accents
    ds.QueryRetrieveLevel = level
    for key in returned:
        setattr(ds, key, "")
    for key, value in matching.items():
        setattr(ds, key, value)
    return ds


def find_studies(server: PacsServer, query: StudyQuery) -> list[StudyInfo]:
    """C-FIND at STUDY level with the query's matching keys."""
    ident = _identifier("STUDY", query.matching_keys(), STUDY_RETURN_KEYS)
    return [study_from_dataset(a) for a in _c_find(server, ident, "a study query")]


def find_series(server: PacsServer, study_uid: str) -> list[SeriesInfo]:
    """C-FIND at SERIES level in one study, then for each series a C-FIND at IMAGE level of one instance for the
    image-level attributes (slice thickness, kernel, image type, orientation, contrast agent, SOP class); all over
    one association."""
    doing = f"a series query of study {study_uid}"
    with _find_association(server, doing) as assoc:
        ident = _identifier("SERIES", {"StudyInstanceUID": study_uid}, SERIES_RETURN_KEYS)
        series = [series_from_dataset(a, study_uid) for a in _c_find(server, ident, doing, assoc)]
        return [complete_from_instance(server, s, assoc) if s.needs_instance_details() else s for s in series]


def complete_from_instance(server: PacsServer, series: SeriesInfo, assoc=None) -> SeriesInfo:
    """``series`` completed with the image-level attributes of one of its instances: a C-FIND at IMAGE level for
    the SOP Instance UIDs (their number when the series answer lacked it), then one for the attributes of the
    first; unchanged when the series has no instance."""
    first = _identifier("IMAGE", {"StudyInstanceUID": series.study_uid, "SeriesInstanceUID": series.series_uid},
                        ("SOPInstanceUID",))
    instances = _c_find(server, first, f"an instance query of series {series.series_uid}", assoc)
    if not instances:
        return series
    sop = min(text(d, "SOPInstanceUID") for d in instances)
    one = _identifier("IMAGE", {"StudyInstanceUID": series.study_uid, "SeriesInstanceUID": series.series_uid,
                                "SOPInstanceUID": sop}, IMAGE_LEVEL_KEYS)
    details = _c_find(server, one, f"the attributes of one instance of series {series.series_uid}", assoc)
    return with_instance_details(series, details[0], n_instances=len(instances)) if details else series


#: C-STORE status for an instance that is not of the series asked for (PS3.4 C.4.2.1.5, "Error: Cannot understand").
NOT_THE_SERIES_ASKED = 0xC000


class _Receiver:
    """C-STORE handler writing each received instance of one series as ``<SOPInstanceUID>.dcm``, bytes as sent.

    An instance of another study or series is refused and not written (``strays``): a PACS answering C-GET with
    more than was asked, or, for C-MOVE, anyone else storing to our listener meanwhile, must never mix another scan
    into the case's series."""

    def __init__(self, folder: Path, study_uid: str, series_uid: str) -> None:
        self.folder = folder
        self.study_uid = study_uid
        self.series_uid = series_uid
        self.written: list[Path] = []
        self.refused: list[str] = []
        self.strays: list[str] = []  # "<SOP Instance UID> (series <Series Instance UID>)"
        self.lock = threading.Lock()

    def __call__(self, event) -> int:
        sop = str(event.request.AffectedSOPInstanceUID or "")
        if not sop:
            with self.lock:
                self.refused.append(sop)
            return 0xA900  # dataset does not match SOP class (no UID)
        try:
            ds = event.dataset
            study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        except Exception:  # undecodable: it cannot be shown to belong to the series
            study, series = "", "?"
        if (study, series) != (self.study_uid, self.series_uid):
            with self.lock:
                self.strays.append(f"{sop} (series {series or 'none'})")
            return NOT_THE_SERIES_ASKED
        path = self.folder / f"{folder_name(sop)}.dcm"
        path.write_bytes(event.encoded_dataset())
        with self.lock:
            self.written.append(path)
        return 0x0000


def _storage_contexts(sop_classes: list[str]) -> list[str]:
    classes = []
    for c in [*sop_classes, CTImageStorage, EnhancedCTImageStorage]:
        if c and c not in classes:
            classes.append(c)
    return classes[: MAX_CONTEXTS - 1]


def _series_identifier(study_uid: str, series_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    return ds


def _check_final(server: PacsServer, status: Dataset | None, doing: str, receiver: _Receiver) -> None:
    code = int(status.Status) if status is not None and "Status" in status else None
    failed = int(status.get("NumberOfFailedSuboperations", 0) or 0) if status is not None else 0
    if (code not in SUCCESS_OR_WARNING or failed) and not receiver.strays:  # strays: the sentence below says why
        raise LumbarBMDError(f"the PACS at {server.describe()} failed {doing}: {_status_text(status)}"
                             + (f", {failed} image(s) not sent" if failed else ""))
    if receiver.strays:
        raise LumbarBMDError(f"{len(receiver.strays)} image(s) of another study or series arrived during {doing} "
                             f"from {server.describe()} and were refused (the first: {receiver.strays[0]}); the "
                             "series was not used, so that no other scan is mixed into it")
    if receiver.refused:
        raise LumbarBMDError(f"the PACS at {server.describe()} sent {len(receiver.refused)} image(s) without a valid "
                             f"SOP Instance UID during {doing}")


def retrieve_series(server: PacsServer, study_uid: str, series_uid: str, folder: Path,
                    sop_classes: list[str] | None = None) -> list[Path]:
    """Retrieve one series into ``folder`` with C-GET (``server.retrieve == "get"``) or C-MOVE to our storage SCP
    on ``server.store_port``. ``sop_classes``: the storage SOP classes to accept besides CT and enhanced CT."""
    folder.mkdir(parents=True, exist_ok=True)
    receiver = _Receiver(folder, study_uid, series_uid)
    classes = _storage_contexts(list(sop_classes or []))
    if server.retrieve == "move":
        return _c_move(server, study_uid, series_uid, receiver, classes)
    doing = f"the retrieval (C-GET) of series {series_uid}"
    ae = _ae(server)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for c in classes:
        ae.add_requested_context(c, TRANSFER_SYNTAXES)
    roles = [build_role(c, scp_role=True) for c in classes]
    final = None
    with _association(server, ae, doing, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, receiver)]) as assoc:
        for status, _ in assoc.send_c_get(_series_identifier(study_uid, series_uid),
                                          StudyRootQueryRetrieveInformationModelGet):
            final = status
            if status is None or "Status" not in status or int(status.Status) not in PENDING:
                break
    _check_final(server, final, doing, receiver)
    return sorted(receiver.written)


def _c_move(server: PacsServer, study_uid: str, series_uid: str, receiver: _Receiver, classes: list[str]) -> list[Path]:
    doing = f"the retrieval (C-MOVE to {server.calling_aet} on port {server.store_port}) of series {series_uid}"
    scp = _ae(server)
    for c in classes:
        scp.add_supported_context(c, TRANSFER_SYNTAXES)
    try:
        listener = scp.start_server(("", server.store_port), block=False,
                                    evt_handlers=[(evt.EVT_C_STORE, receiver)])
    except OSError as err:
        raise LumbarBMDError(f"cannot listen on port {server.store_port} for C-MOVE ({err.strerror or err}); choose "
                             "another store_port (and tell the PACS) or use retrieve=get") from None
    try:
        ae = _ae(server)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        final = None
        with _association(server, ae, doing) as assoc:
            for status, _ in assoc.send_c_move(_series_identifier(study_uid, series_uid), server.calling_aet,
                                               StudyRootQueryRetrieveInformationModelMove):
                final = status
                if status is None or "Status" not in status or int(status.Status) not in PENDING:
                    break
        try:
            _check_final(server, final, doing, receiver)
        except LumbarBMDError as err:
            raise LumbarBMDError(f"{err}; the PACS must know our AE title {server.calling_aet} as a C-MOVE destination "
                                 f"at this computer's address and port {server.store_port}") from None
    finally:
        listener.shutdown()
    return sorted(receiver.written)


def store_files(server: PacsServer, paths: list[Path]) -> list[str]:
    """C-STORE of DICOM files over one association; returns the stored SOP Instance UIDs, or raises a sentence
    naming the first file the PACS refused."""
    headers = [(Path(p), pydicom.dcmread(p, stop_before_pixels=True)) for p in paths]
    syntaxes: dict[str, list[str]] = {}
    for _, ds in headers:
        meta = getattr(ds, "file_meta", None)
        ts = str(getattr(meta, "TransferSyntaxUID", "") or uids.ImplicitVRLittleEndian)
        found = syntaxes.setdefault(str(ds.SOPClassUID), [uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian])
        if ts not in found:
            found.insert(0, ts)
    if len(syntaxes) > MAX_CONTEXTS:
        raise LumbarBMDError(f"{len(syntaxes)} different kinds of DICOM object to send: at most {MAX_CONTEXTS} per "
                             "association; send them in smaller groups")
    ae = _ae(server)
    for sop_class, ts in syntaxes.items():
        ae.add_requested_context(sop_class, ts)
    stored = []
    with _association(server, ae, f"storing {len(paths)} file(s) (C-STORE)") as assoc:
        for path, ds in headers:
            status = assoc.send_c_store(path)
            code = int(status.Status) if status is not None and "Status" in status else None
            if code not in SUCCESS_OR_WARNING:
                raise LumbarBMDError(f"the PACS at {server.describe()} refused {path.name} (C-STORE): "
                                     f"{_status_text(status)}")
            stored.append(str(ds.SOPInstanceUID))
    return stored
