"""Studies from a PACS: query, series choice, retrieval, resumable fetch and sending back, against a real Orthanc.

The PACS holds (uploaded through Orthanc's REST API, not through the code under test):

- study 1 — the real chest CT (``chest-ct-negative``: Philips, 64 × 5 mm, lung kernel ``L``), plus copies with new
  UIDs: the same slices re-labelled with the soft-tissue kernel ``B`` (the series to choose), a derived 10 mm
  reformat of every other slice, and a localizer;
- study 2 (another patient, 2024-03-15) — a non-contrast and an arterial series (40 slices each, kernel ``B``) and a
  sagittal series;
- study 3 (the same patient, 2024-06-01) — a single 10-slice series (50 mm, too short for L1–L4).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from dataclasses import replace
from pathlib import Path

import orthanc_fixture
import pydicom
import pytest
from orthanc_fixture import OrthancInstance, orthanc  # noqa: F401  (the fixture is used by name)
from pydicom.uid import generate_uid

from LumbarBMDLib import pacs
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.pacs import dicomweb, dimse
from LumbarBMDLib.pacs.fetch import MARKER, fetch_studies, pacs_inputs, read_marker, send_back, send_files
from LumbarBMDLib.pacs.query import SeriesInfo, StudyQuery, folder_name
from LumbarBMDLib.pacs.selection import choose_series, classify_kernel, contrast_status, refusal
from LumbarBMDLib.pacs.server import parse_server
from LumbarBMDLib.volume import read_ct

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "chest-ct-negative"
PATIENT_1 = "Lung_Dx-A0001"
PATIENT_2 = "LBMD-PACS-2"


# --- test data ---------------------------------------------------------------------------------------------------


def _copy_series(sources: list[Path], out: Path, study_uid: str | None = None, **changes) -> list[Path]:
    """Copies of ``sources`` as a new series (new Series and SOP Instance UIDs; a new study when ``study_uid``), with
    the attribute ``changes`` applied to every file."""
    out.mkdir(parents=True)
    series_uid = generate_uid()
    written = []
    for i, src in enumerate(sources):
        ds = pydicom.dcmread(src)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if study_uid:
            ds.StudyInstanceUID = study_uid
        for key, value in changes.items():
            setattr(ds, key, value)
        ds.InstanceNumber = i + 1
        path = out / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def _pixel_hashes(paths: list[Path]) -> dict[str, str]:
    """SOP Instance UID -> sha256 of the pixel data bytes."""
    out = {}
    for p in paths:
        ds = pydicom.dcmread(p)
        out[str(ds.SOPInstanceUID)] = hashlib.sha256(ds.PixelData).hexdigest()
    return out


@pytest.fixture(scope="module")
def archive(orthanc: OrthancInstance, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811
    """Write the three studies and upload them to Orthanc; returns their UIDs and files."""
    real = sorted(REAL.glob("*.dcm"))
    assert len(real) == 64, f"the real chest CT is missing: {REAL}"
    root = tmp_path_factory.mktemp("archive")
    study_1 = str(pydicom.dcmread(real[0], stop_before_pixels=True).StudyInstanceUID)
    soft = _copy_series(real, root / "soft", ConvolutionKernel="B", SeriesDescription="5mm soft B", SeriesNumber=3)
    derived = _copy_series(real[::2], root / "derived", ConvolutionKernel="B", SeriesDescription="10mm MPR",
                           SeriesNumber=4, SliceThickness="10", ImageType=["DERIVED", "SECONDARY", "REFORMATTED"])
    localizer = _copy_series(real[:1], root / "localizer", SeriesDescription="Surview", SeriesNumber=1,
                             ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    study_2, study_3 = generate_uid(), generate_uid()
    patient_2 = {"PatientID": PATIENT_2, "PatientName": "LBMD^PACS^TWO"}
    nc = _copy_series(real[:40], root / "nc", study_2, StudyDate="20240315", AccessionNumber="ACC-2",
                      SeriesDescription="NC 5mm", SeriesNumber=2, ConvolutionKernel="B", **patient_2)
    art = _copy_series(real[:40], root / "art", study_2, StudyDate="20240315", AccessionNumber="ACC-2",
                       SeriesDescription="Arterial 5mm", SeriesNumber=3, ConvolutionKernel="B",
                       ContrastBolusAgent="Iohexol", **patient_2)
    sagittal = _copy_series(real[:30], root / "sag", study_2, StudyDate="20240315", AccessionNumber="ACC-2",
                            SeriesDescription="Sag 5mm", SeriesNumber=5, ConvolutionKernel="B",
                            ImageOrientationPatient=[0, 1, 0, 0, 0, -1], **patient_2)
    short = _copy_series(real[:10], root / "short", study_3, StudyDate="20240601", AccessionNumber="ACC-3",
                         SeriesDescription="Limited 5mm", SeriesNumber=2, ConvolutionKernel="B", **patient_2)
    orthanc.upload(real + soft + derived + localizer + nc + art + sagittal + short)
    uid = lambda files: str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)  # noqa: E731
    return {
        "study_1": study_1, "study_2": study_2, "study_3": study_3,
        "real": uid(real), "soft": uid(soft), "derived": uid(derived), "localizer": uid(localizer),
        "nc": uid(nc), "art": uid(art), "sagittal": uid(sagittal), "short": uid(short),
        "soft_files": soft, "nc_files": nc, "root": root,
    }


def _servers(orthanc: OrthancInstance) -> dict[str, str]:  # noqa: F811
    dimse_url = f"dimse://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}?aet={orthanc.store_aet}"
    return {"dicomweb": f"dicomweb+{orthanc.dicomweb_url}", "c-get": dimse_url,
            "c-move": f"{dimse_url}&retrieve=move&store_port={orthanc.store_port}"}


# --- plain functions (no server) ---------------------------------------------------------------------------------


def test_parse_server_forms_and_errors() -> None:
    web = parse_server("dicomweb+http://pacs.example:8042/dicom-web/")
    assert (web.protocol, web.url) == ("dicomweb", "http://pacs.example:8042/dicom-web")
    secret = parse_server("https://reader:s3cret@pacs.example/dicom-web")
    assert (secret.url, secret.username, secret.password) == ("https://pacs.example/dicom-web", "reader", "s3cret")
    assert "s3cret" not in secret.describe()
    dim = parse_server("dimse://ORTHANC@pacs.example:4242?aet=BMDSCU&retrieve=move&store_port=11113")
    assert (dim.protocol, dim.host, dim.port, dim.called_aet, dim.calling_aet, dim.retrieve, dim.store_port) == \
        ("dimse", "pacs.example", 4242, "ORTHANC", "BMDSCU", "move", 11113)
    assert parse_server("dimse://PACS@10.0.0.5").port == 104
    assert parse_server("dimse://PACS@h").calling_aet == "LUMBARBMD"
    for bad, words in [("ftp://x/y", "not a PACS address"), ("dimse://host:4242", "no called AE title"),
                       ("dimse://A@h:1?retrieve=move", "store_port"), ("dimse://A@h:1?colour=red", "unknown option"),
                       ("dimse://A@h:1?aet=MUCH_TOO_LONG_AE_TITLE", "not a valid DICOM AE title")]:
        with pytest.raises(LumbarBMDError, match=words):
            parse_server(bad)


def test_study_query_dates_and_refusals() -> None:
    q = StudyQuery.from_dict({"PatientID": "P1", "study_date": "20240101-20241231"})
    assert q.matching_keys() == {"PatientID": "P1", "StudyDate": "20240101-20241231", "ModalitiesInStudy": "CT"}
    assert StudyQuery(study_date="20240101-").study_date == "20240101-"
    assert StudyQuery(study_date="-20240101").study_date == "-20240101"
    for bad in ["2024-01-01", "20240101-2024", "20241231-20240101", "-"]:
        with pytest.raises(LumbarBMDError, match="study date"):
            StudyQuery(patient_id="P1", study_date=bad)
    with pytest.raises(LumbarBMDError, match="at least one of"):
        StudyQuery()
    with pytest.raises(LumbarBMDError, match="unknown PACS query field 'colour'"):
        StudyQuery.from_dict({"colour": "red"})


def test_without_the_archive_extra_a_sentence_says_what_to_install() -> None:
    """pynetdicom and dicomweb-client missing: the package imports, and a query says what to install."""
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("pynetdicom", "dicomweb_client"):
                    raise ModuleNotFoundError(name, name=name)
        sys.meta_path.insert(0, Block())
        import LumbarBMDLib.pacs as pacs
        from LumbarBMDLib.errors import LumbarBMDError
        for spec in ("dimse://PACS@127.0.0.1:9", "http://127.0.0.1:9/dicom-web"):
            try:
                pacs.find_studies(pacs.parse_server(spec), pacs.StudyQuery(patient_id="P"))
            except LumbarBMDError as err:
                print(err)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all("pip install 'lumbarbmd[archive]'" in line for line in lines)
    assert "DIMSE needs pynetdicom" in lines[0] and "DICOMweb needs dicomweb-client" in lines[1]


def test_folder_names_from_uids_stay_in_the_cache() -> None:
    assert folder_name("1.2.840.10008.5.1") == "1.2.840.10008.5.1"
    for bad in ["../../etc", "1..2", "1.2.abc", "1.2/3", "9" * 65, ".1.2"]:
        name = folder_name(bad)
        assert name.startswith("uid-") and len(name) == 36 and "/" not in name and ".." not in name
    assert folder_name("../x") != folder_name("../y")
    with pytest.raises(LumbarBMDError, match="without an Instance UID"):
        folder_name("")


@pytest.mark.parametrize("kernel, kind", [
    ("B30f", "soft"), ("B31s", "soft"), ("I30f\\3", "soft"), ("Br40", "soft"), ("Bv36", "soft"), ("Q30f", "soft"),
    ("B70f", "sharp"), ("Br64", "sharp"), ("Bl57", "sharp"), ("I70f", "sharp"),
    ("STANDARD", "soft"), ("SOFT", "soft"), ("BONE", "sharp"), ("LUNG", "sharp"), ("BONEPLUS", "sharp"),
    ("B", "soft"), ("C", "soft"), ("A", "soft"), ("D", "sharp"), ("L", "sharp"), ("YB", "sharp"), ("EC", "sharp"),
    ("FC07", "soft"), ("FC08", "soft"), ("FC18", "soft"), ("FC30", "sharp"), ("FC52", "sharp"), ("FC86", "sharp"),
    ("", "unknown"), ("XYZ", "unknown"),
])
def test_kernel_table(kernel: str, kind: str) -> None:
    assert classify_kernel(kernel)[0] == kind


def test_kernel_sentences_name_the_kind_and_vendor() -> None:
    assert classify_kernel("L")[1] == "lung kernel L (Philips)"
    assert classify_kernel("FC52")[1] == "lung kernel FC52 (Canon)"
    assert classify_kernel("FC30")[1] == "sharp (bone) kernel FC30 (Canon)"
    assert classify_kernel("BONEPLUS")[1] == "bone kernel BONEPLUS (GE)"
    assert classify_kernel("Br40\\2")[1] == "soft-tissue kernel Br40 (Siemens)"
    assert classify_kernel("")[1] == "kernel not recorded"


def _info(uid: str, **kw) -> SeriesInfo:
    base = dict(study_uid="1.2", series_uid=uid, modality="CT", description=uid, n_instances=200,
                slice_thickness=2.0, kernel="B30f", image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    base.update(kw)
    return SeriesInfo(**base)


def test_choose_series_rules_and_sentences() -> None:
    series = [
        _info("1.1", kernel="B70f", slice_thickness=1.0),  # sharp, thinnest
        _info("1.2", contrast_agent="Omnipaque", slice_thickness=1.0),  # soft, contrast
        _info("1.3", slice_thickness=2.0),  # soft, non-contrast: chosen
        _info("1.4", slice_thickness=3.0),  # thicker
        _info("1.5", image_type=("DERIVED", "SECONDARY", "MPR"), slice_thickness=0.5, n_instances=800),
        _info("1.6", modality="SR"), _info("1.7", sop_class_uid="1.2.840.10008.5.1.4.1.1.7"),
        _info("1.8", orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0)), _info("1.9", n_instances=20),
        _info("1.10", description="DOSE REPORT"),
        _info("1.11", orientation=(1.0, 0.0, 0.0, 0.0, 0.97, -0.26)),  # 15° gantry tilt: still axial
    ]
    choice = choose_series(series)
    assert choice.chosen is not None and choice.chosen.series_uid == "1.3"
    why = choice.reasons
    assert why["1.3"].startswith("chosen") and "soft-tissue kernel B30f (Siemens)" in why["1.3"]
    assert "sharp (bone/lung) kernel B70f (Siemens), while the chosen series has a soft-tissue kernel" in why["1.1"]
    assert "contrast agent Omnipaque" in why["1.2"]
    assert "thicker slices (3 mm)" in why["1.4"]
    assert "derived" in why["1.5"]
    assert "not a CT (modality SR)" in why["1.6"] and "secondary capture" in why["1.7"]
    assert "not axial" in why["1.8"] and "sagittal" in why["1.8"]
    assert "too short" in why["1.9"] and "40 mm" in why["1.9"]
    assert "dose report" in why["1.10"]
    assert why["1.11"].startswith("passed over") and "not axial" not in why["1.11"]
    assert all(s.startswith(("chosen", "passed over")) for s in why.values()) and len(why) == len(series)
    # Only a sharp, contrast-enhanced series: measured, with the caveats said.
    only = choose_series([_info("2.1", kernel="FC52", description="Arterial")])
    assert only.chosen is not None and "sharp kernel may bias" in only.sentence and "contrast-enhanced" in only.sentence
    # Nothing acceptable: a clear sentence naming every series.
    none = choose_series([series[5], series[8]])
    assert none.chosen is None and none.sentence.startswith("no acceptable series")
    assert "not a CT" in none.sentence and "too short" in none.sentence
    assert choose_series([]).chosen is None
    # The order the PACS answers in does not change the choice.
    assert choose_series(list(reversed(series))).chosen.series_uid == "1.3"
    assert contrast_status(_info("3", description="Abdomen NATIVE"))[0] is False
    # Body part: a head CT is refused; an abdomen beats a chest (which often ends above L1) despite its kernel.
    parts = choose_series([_info("5.1", body_part="CHEST"), _info("5.2", body_part="ABDOMEN", kernel="B70f"),
                           _info("5.3", body_part="HEAD")])
    assert parts.chosen.series_uid == "5.2" and "body part ABDOMEN" in parts.sentence
    assert "body part CHEST, while the chosen series is of the ABDOMEN" in parts.reasons["5.1"]
    assert "no lumbar spine" in parts.reasons["5.3"]
    assert choose_series([_info("6.1", body_part="C-SPINE")]).chosen is None
    assert refusal(_info("4", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))).startswith("a localizer")


def test_fixture_fails_without_orthanc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No Orthanc installed: the fixture fails (it never skips) and says what to install."""
    monkeypatch.setattr(orthanc_fixture, "ORTHANC", str(tmp_path / "no-such-orthanc"))
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install -y orthanc orthanc-dicomweb"):
        orthanc_fixture.start_orthanc(tmp_path)
    monkeypatch.setattr(orthanc_fixture, "DICOMWEB_PLUGIN_CANDIDATES", (str(tmp_path / "no-plugin.so"),))
    monkeypatch.setattr(orthanc_fixture, "ORTHANC", "/bin/true")
    with pytest.raises(pytest.fail.Exception, match=r"DICOMweb plugin is not installed.*apt-get install"):
        orthanc_fixture.start_orthanc(tmp_path)


# --- against Orthanc -----------------------------------------------------------------------------------------------


@pytest.mark.real
@pytest.mark.parametrize("protocol", ["dicomweb", "c-get"])
def test_query_studies(orthanc: OrthancInstance, archive: dict, protocol: str) -> None:  # noqa: F811
    server = parse_server(_servers(orthanc)[protocol])
    uids = lambda q: [s.study_uid for s in pacs.find_studies(server, StudyQuery(**q))]  # noqa: E731
    found = pacs.find_studies(server, StudyQuery(patient_id=PATIENT_1))
    assert [s.study_uid for s in found] == [archive["study_1"]]
    assert (found[0].study_date, found[0].patient_id, found[0].modalities) == ("20070404", PATIENT_1, ("CT",))
    assert uids({"patient_id": PATIENT_2, "study_date": "20240101-20240430"}) == [archive["study_2"]]
    both = [archive["study_2"], archive["study_3"]]
    assert uids({"patient_id": PATIENT_2, "study_date": "20240101-20241231"}) == both
    assert uids({"study_date": "20240501-"}) == [archive["study_3"]]
    assert uids({"patient_id": PATIENT_1, "study_date": "20240101-20241231"}) == []
    assert uids({"patient_name": "LBMD^PACS*"}) == both
    assert uids({"patient_name": "lbmd^pacs^two"}) == both
    assert uids({"patient_name": "LBMD^OTHER*"}) == []
    assert uids({"accession_number": "ACC-3"}) == [archive["study_3"]]
    assert uids({"study_instance_uid": archive["study_2"]}) == [archive["study_2"]]
    assert uids({"patient_id": PATIENT_1, "modality": "MR"}) == []


@pytest.mark.real
@pytest.mark.parametrize("protocol", ["dicomweb", "c-get"])
def test_series_attributes_and_choice(orthanc: OrthancInstance, archive: dict, protocol: str) -> None:  # noqa: F811
    server = parse_server(_servers(orthanc)[protocol])
    series = {s.series_uid: s for s in pacs.find_series(server, archive["study_1"])}
    assert set(series) == {archive[k] for k in ("real", "soft", "derived", "localizer")}
    real, derived = series[archive["real"]], series[archive["derived"]]
    assert (real.modality, real.n_instances, real.slice_thickness, real.kernel) == ("CT", 64, 5.0, "L")
    assert real.image_type[:2] == ("ORIGINAL", "PRIMARY") and real.orientation == (1, 0, 0, 0, 1, 0)
    assert real.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2" and real.contrast_agent == ""
    assert (derived.n_instances, derived.slice_thickness, derived.image_type[0]) == (32, 10.0, "DERIVED")
    choice = choose_series(list(series.values()))
    assert choice.chosen.series_uid == archive["soft"]
    assert "soft-tissue kernel B (Philips)" in choice.sentence
    assert "lung kernel L (Philips), while the chosen series has a soft-tissue kernel B" in \
        choice.reasons[archive["real"]]
    assert "derived" in choice.reasons[archive["derived"]]
    assert "localizer" in choice.reasons[archive["localizer"]]
    study_2 = choose_series(pacs.find_series(server, archive["study_2"]))
    assert study_2.chosen.series_uid == archive["nc"]
    assert "contrast agent Iohexol" in study_2.reasons[archive["art"]]
    assert "not axial" in study_2.reasons[archive["sagittal"]]
    # The image-level attributes of a bare series record come from one instance's metadata.
    bare = SeriesInfo(study_uid=archive["study_2"], series_uid=archive["art"])
    assert bare.needs_instance_details()
    impl = dicomweb if protocol == "dicomweb" else dimse
    full = impl.complete_from_instance(server, bare)
    assert (full.kernel, full.contrast_agent, full.slice_thickness, full.details_from_instance) == \
        ("B", "Iohexol", 5.0, True)
    assert full.n_instances == 40  # counted, as the bare record lacked it
    assert full.image_type[:2] == ("ORIGINAL", "PRIMARY") and full.orientation == (1, 0, 0, 0, 1, 0)


@pytest.mark.real
@pytest.mark.parametrize("protocol", ["dicomweb", "c-get", "c-move"])
def test_retrieve_identical(orthanc: OrthancInstance, archive: dict, protocol: str,  # noqa: F811
                            tmp_path: Path) -> None:
    server = parse_server(_servers(orthanc)[protocol])
    series = next(s for s in pacs.find_series(server, archive["study_1"]) if s.series_uid == archive["soft"])
    got = pacs.retrieve_series(server, series, tmp_path / "series")
    assert len(got) == 64
    assert {p.name for p in got} == {f"{uid}.dcm" for uid in _pixel_hashes(archive["soft_files"])}
    assert _pixel_hashes(got) == _pixel_hashes(archive["soft_files"])
    volume = read_ct(tmp_path / "series")
    assert volume.metadata["series_instance_uid"] == archive["soft"]
    assert volume.hu.shape == (64, 512, 512) and abs(volume.spacing[2] - 5.0) < 1e-3


class _AsStoredRefused:
    """A real HTTP front to the test Orthanc's DICOMweb that behaves like a PACS unable to send instances "as
    stored": a WADO-RS request accepting ``transfer-syntax=*`` gets 406 Not Acceptable (as several archives answer);
    every other request is passed to Orthanc unchanged. ``refused`` counts the refusals."""

    def __init__(self, orthanc_url: str):
        import http.server
        import urllib.error
        import urllib.request

        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                accept = self.headers.get("Accept", "")
                if "transfer-syntax=*" in accept.replace(" ", "").replace('"', ""):
                    front.refused += 1
                    self.send_response(406)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                request = urllib.request.Request(orthanc_url + self.path, headers={"Accept": accept} if accept else {})
                try:
                    with urllib.request.urlopen(request, timeout=60) as answer:
                        status, headers, body = answer.status, answer.headers, answer.read()
                except urllib.error.HTTPError as err:
                    status, headers, body = err.code, err.headers, err.read()
                self.send_response(status)
                self.send_header("Content-Type", headers.get("Content-Type", "application/octet-stream"))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.refused = 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.real
def test_retrieve_from_a_server_that_cannot_send_as_stored_falls_back_to_its_default(
        orthanc: OrthancInstance, archive: dict, tmp_path: Path) -> None:  # noqa: F811
    front = _AsStoredRefused(orthanc.http_url)
    try:
        server = parse_server(f"dicomweb+{front.url}/dicom-web")
        series = next(s for s in pacs.find_series(server, archive["study_1"]) if s.series_uid == archive["soft"])
        got = pacs.retrieve_series(server, series, tmp_path / "series")
    finally:
        front.close()
    assert front.refused == 1  # asked as stored once, refused, then asked in the server's default syntax
    assert len(got) == 64 and _pixel_hashes(got) == _pixel_hashes(archive["soft_files"])
    assert pydicom.dcmread(got[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert read_ct(tmp_path / "series").metadata["series_instance_uid"] == archive["soft"]


@pytest.mark.real
def test_an_instance_of_another_series_is_refused_and_the_retrieval_fails_with_a_sentence(
        orthanc: OrthancInstance, archive: dict, tmp_path: Path) -> None:  # noqa: F811
    """What our storage SCP does when something else than the series asked for arrives (a PACS answering C-GET with
    more, or anyone storing to the C-MOVE listener meanwhile): a real association to a real SCP on loopback."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    folder = tmp_path / "series"
    folder.mkdir()
    receiver = dimse._Receiver(folder, archive["study_1"], archive["soft"])
    scp = AE(ae_title=orthanc.store_aet)
    scp.add_supported_context(CTImageStorage, dimse.TRANSFER_SYNTAXES)
    port = orthanc_fixture.free_port()
    listener = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, receiver)])
    try:
        scu = AE(ae_title="INTRUDER")
        scu.add_requested_context(CTImageStorage, dimse.TRANSFER_SYNTAXES[:2])
        assoc = scu.associate("127.0.0.1", port, ae_title=orthanc.store_aet)
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(f).Status) for f in (archive["soft_files"][0], archive["nc_files"][0])]
        assoc.release()
    finally:
        listener.shutdown()
    assert statuses == [0x0000, dimse.NOT_THE_SERIES_ASKED]
    assert [p.name for p in folder.iterdir()] == [f"{_pixel_hashes(archive['soft_files'][:1]).popitem()[0]}.dcm"]
    done = pydicom.Dataset()
    done.Status = 0x0000
    with pytest.raises(LumbarBMDError, match=r"1 image\(s\) of another study or series arrived") as err:
        dimse._check_final(parse_server(_servers(orthanc)["c-move"]), done, "the retrieval (C-MOVE)", receiver)
    assert archive["nc"] in str(err.value) and "not used" in str(err.value)


def _stats(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.real
def test_fetch_resumes_and_goes_on_after_a_failed_study(orthanc: OrthancInstance, archive: dict,  # noqa: F811
                                                        tmp_path: Path) -> None:
    server = _servers(orthanc)["dicomweb"]
    query = {"patient_id": PATIENT_2, "study_date": "20240101-20241231"}
    cache = tmp_path / "cache"
    first = fetch_studies(server, query, cache)
    assert [f.study.study_uid for f in first] == [archive["study_2"], archive["study_3"]]
    ok, failed = first
    assert ok.ok and not ok.from_cache and ok.n_files == 40 and ok.retrieved_with == "WADO-RS"
    assert ok.series_folder == cache / archive["study_2"] / archive["nc"]
    assert "NC 5mm" in ok.choice and any("Iohexol" in r for r in ok.reasons)
    assert _pixel_hashes(sorted(ok.series_folder.glob("*.dcm"))) == _pixel_hashes(archive["nc_files"])
    assert not failed.ok and failed.series_folder is None
    assert failed.error.startswith(f"study {archive['study_3']}") and "too short" in failed.error
    assert not (cache / archive["study_3"]).exists()
    marker = json.loads((cache / archive["study_2"] / MARKER).read_text())
    assert marker["series_instance_uid"] == archive["nc"] and len(marker["files"]) == 40
    # Second run: nothing downloaded (same files, same inodes and times), the same answer from the marker.
    before = _stats(cache / archive["study_2"])
    second = fetch_studies(server, query, cache)
    assert second[0].from_cache and second[0].series_folder == ok.series_folder and second[0].choice == ok.choice
    assert _stats(cache / archive["study_2"]) == before
    assert second[1].error == failed.error
    # Interrupted download: marker absent and one file gone: the study is downloaded again, completely.
    (cache / archive["study_2"] / MARKER).unlink()
    victim = sorted(ok.series_folder.glob("*.dcm"))[7]
    victim.unlink()
    assert read_marker(cache / archive["study_2"]) is None
    third = fetch_studies(server, query, cache)
    assert not third[0].from_cache and third[0].n_files == 40 and victim.is_file()
    assert read_marker(cache / archive["study_2"]) is not None
    after = _stats(cache / archive["study_2"])
    assert all(ino != before[name][0] for name, (ino, _) in after.items() if name in before)
    # A truncated file (marker present) is also detected and redone.
    with victim.open("r+b") as f:
        f.truncate(1000)
    assert read_marker(cache / archive["study_2"]) is None
    fourth = fetch_studies(server, {"study_instance_uid": archive["study_2"]}, cache)
    assert not fourth[0].from_cache and victim.stat().st_size > 1000
    # A writer killed mid-download leaves a hidden temporary folder: removed at the next start.
    stale = cache / f".{archive['study_2']}.tmp-deadbeef"
    stale.mkdir()
    fetch_studies(server, {"study_instance_uid": archive["study_2"]}, cache)
    assert not stale.exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]


@pytest.mark.real
def test_two_fetches_of_one_study_at_once(orthanc: OrthancInstance, archive: dict,  # noqa: F811
                                         tmp_path: Path) -> None:
    """Two writers on one cache: they take turns per study; one downloads, the other finds it complete."""
    server = _servers(orthanc)["dicomweb"]
    results: list = []
    errors: list = []

    def fetch() -> None:
        try:
            results.append(fetch_studies(server, {"study_instance_uid": archive["study_2"]}, tmp_path / "cache")[0])
        except Exception as err:  # reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 2 and all(r.ok for r in results)
    assert sorted(r.from_cache for r in results) == [False, True]
    assert read_marker(tmp_path / "cache" / archive["study_2"]) is not None
    assert len(list(results[0].series_folder.glob("*.dcm"))) == 40


@pytest.mark.real
def test_pacs_inputs_for_the_batch_over_c_get(orthanc: OrthancInstance, archive: dict,  # noqa: F811
                                              tmp_path: Path) -> None:
    spec = _servers(orthanc)["c-get"]
    inputs = pacs_inputs(spec, {"PatientName": "LBMD*"}, tmp_path / "cache")
    assert len(inputs) == 2
    (folder, prov), (none, failed) = inputs
    assert folder == tmp_path / "cache" / archive["study_2"] / archive["nc"] and len(list(folder.glob("*.dcm"))) == 40
    assert prov["server"] == parse_server(spec).describe() and prov["retrieved_with"] == "C-GET"
    assert (prov["study_instance_uid"], prov["series_instance_uid"], prov["error"]) == \
        (archive["study_2"], archive["nc"], None)
    assert prov["series_choice"].startswith("chosen series 2 'NC 5mm'") and len(prov["series_reasons"]) == 3
    assert prov["query"] == {"patient_name": "LBMD*", "modality": "CT"}
    json.dumps(prov)  # plain data for results.json
    assert none is None and "too short" in failed["error"]
    assert read_ct(folder).metadata["series_instance_uid"] == archive["nc"]
    with pytest.raises(LumbarBMDError, match="no study on the PACS"):
        pacs_inputs(spec, {"patient_id": "NOBODY"}, tmp_path / "cache")


def _result_files(archive: dict, out: Path, label: str) -> list[Path]:
    """Two DICOM objects 'results' in study 2: a Comprehensive SR and a secondary-capture image (new series)."""
    out.mkdir()
    ref = pydicom.dcmread(archive["nc_files"][0])
    sr = pydicom.Dataset()
    for key in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber"):
        setattr(sr, key, ref.get(key, ""))
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    sr.SOPInstanceUID, sr.SeriesInstanceUID = generate_uid(), generate_uid()
    sr.Modality, sr.SeriesNumber, sr.InstanceNumber = "SR", 900, 1
    sr.SeriesDescription = f"LumbarBMD report {label}"
    sr.ValueType, sr.CompletionFlag, sr.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    sr.file_meta = pydicom.dataset.FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    sr.file_meta.MediaStorageSOPClassUID, sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPClassUID, sr.SOPInstanceUID
    sr.save_as(out / "sr.dcm", enforce_file_format=True)
    sc = _copy_series(archive["nc_files"][:1], out / "sc", SOPClassUID="1.2.840.10008.5.1.4.1.1.7",
                      SeriesDescription=f"LumbarBMD sagittal {label}", SeriesNumber=901, Modality="OT")[0]
    return [out / "sr.dcm", sc]


@pytest.mark.real
@pytest.mark.parametrize("protocol", ["dicomweb", "c-get"])
def test_send_back_and_find_again(orthanc: OrthancInstance, archive: dict, protocol: str,  # noqa: F811
                                  tmp_path: Path) -> None:
    spec = _servers(orthanc)[protocol]
    files = _result_files(archive, tmp_path / "results", protocol)
    sent = send_back(spec, files)
    expected = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    assert set(sent) == expected
    again = {s.series_uid: s for s in pacs.find_series(parse_server(spec), archive["study_2"])}
    for f in files:
        ds = pydicom.dcmread(f)
        found = again[str(ds.SeriesInstanceUID)]
        assert found.n_instances == 1 and found.description == str(ds.SeriesDescription)
        assert found.modality == str(ds.Modality)
    stored = orthanc.rest(f"/instances/{orthanc.rest('/tools/lookup', expected.pop().encode(), 'text/plain')[0]['ID']}")
    assert stored["ParentSeries"]
    # The results do not change the choice for the study.
    assert choose_series(list(again.values())).chosen.series_uid == archive["nc"]
    with pytest.raises(LumbarBMDError, match="not a DICOM file"):
        send_files(spec, [tmp_path / "missing.dcm"])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.real
def test_failures_are_sentences(orthanc: OrthancInstance, archive: dict, tmp_path: Path) -> None:  # noqa: F811
    query = StudyQuery(patient_id=PATIENT_1)
    port = _closed_port()
    with pytest.raises(LumbarBMDError, match="could not reach the PACS"):
        pacs.find_studies(parse_server(f"http://127.0.0.1:{port}/dicom-web"), query)
    with pytest.raises(LumbarBMDError, match=r"answered HTTP 404.*base URL"):
        pacs.find_studies(parse_server(f"{orthanc.http_url}/not-dicom-web"), query)
    with pytest.raises(LumbarBMDError, match=r"could not open a DICOM association.*no DICOM answer"):
        pacs.find_studies(parse_server(f"dimse://ORTHANC@127.0.0.1:{port}?timeout=3"), query)
    with pytest.raises(LumbarBMDError, match=r"rejected the association.*called AE title must be WRONG"):
        pacs.find_studies(parse_server(f"dimse://WRONG@127.0.0.1:{orthanc.dicom_port}"), query)
    # An AE title the PACS does not know is refused the query.
    with pytest.raises(LumbarBMDError, match=r"failed a study query|could not open"):
        pacs.find_studies(parse_server(f"dimse://ORTHANC@127.0.0.1:{orthanc.dicom_port}?aet=STRANGER"), query)
    # A retrieval that fails for one study leaves no folder and the sentence in the study's record.
    # (C-MOVE while our storage SCP listens on another port than the one the PACS sends to.)
    bad_move = replace(parse_server(_servers(orthanc)["c-move"]), store_port=_closed_port())
    fetched = fetch_studies(bad_move, {"study_instance_uid": archive["study_1"]}, tmp_path / "cache")
    assert len(fetched) == 1 and not fetched[0].ok and "C-MOVE destination" in fetched[0].error
    assert not (tmp_path / "cache" / archive["study_1"]).exists()
    assert os.listdir(tmp_path / "cache") in ([], [".lumbarbmd-locks"])
