"""A real Orthanc PACS (with its DICOMweb plugin) for the PACS tests, started from its own temporary configuration.

Import the fixture into a test file (``from orthanc_fixture import orthanc  # noqa: F401``) and request ``orthanc``
by name. It is module-scoped: one Orthanc per test file. Everything it stores lives in a temporary folder; it
listens on free loopback ports; it is stopped (terminate, then kill) when the module's tests end, even when a test
fails. Without Orthanc installed the fixture fails (never skips) and says what to install.

The configuration declares the tests' own storage SCP (``STORE_SCP_AET`` at ``store_port``) as a DICOM modality, so
that Orthanc can C-MOVE to it and accepts its C-FIND, C-GET and C-STORE requests.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ORTHANC = os.environ.get("LUMBARBMD_ORTHANC", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/plugins/libOrthancDicomWeb.so",
)
ORTHANC_AET = "ORTHANC"
STORE_SCP_AET = "LUMBARBMD"  # our AE title: the C-FIND/C-GET/C-STORE calling AE and the C-MOVE destination
INSTALL_HINT = "install it with `apt-get install -y orthanc orthanc-dicomweb` (CI installs both)"
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class OrthancInstance:
    """A running Orthanc: where to reach it over HTTP (REST and DICOMweb) and DICOM, and our declared SCP."""

    http_url: str  # http://127.0.0.1:<port>, the REST API
    dicomweb_url: str  # <http_url>/dicom-web
    host: str
    dicom_port: int
    aet: str
    store_aet: str  # the AE title Orthanc knows as the tests' storage SCP (C-MOVE destination)
    store_port: int  # where that SCP must listen for C-MOVE
    folder: Path  # storage, index, configuration and log
    log_path: Path

    def rest(self, path: str, data: bytes | None = None, content_type: str = "application/json") -> object:
        """Call Orthanc's REST API (GET, or POST when ``data`` is given) and return the decoded JSON answer."""
        request = urllib.request.Request(self.http_url + path, data=data,
                                         headers={"Content-Type": content_type} if data is not None else {})
        with urllib.request.urlopen(request, timeout=60) as answer:
            body = answer.read()
        return json.loads(body) if body else None

    def upload(self, paths: list[Path]) -> list[str]:
        """Store DICOM files through the REST API (``POST /instances``, not the code under test); Orthanc ids."""
        ids = []
        for p in paths:
            answer = self.rest("/instances", Path(p).read_bytes(), "application/dicom")
            assert isinstance(answer, dict) and answer.get("Status") in ("Success", "AlreadyStored"), answer
            ids.append(answer["ID"])
        return ids


def free_port() -> int:
    """A TCP port free on the loopback interface now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dicomweb_plugin() -> str | None:
    """Path of the Orthanc DICOMweb plugin, None when not installed."""
    return next((p for p in DICOMWEB_PLUGIN_CANDIDATES if Path(p).is_file()), None)


def orthanc_config(folder: Path, http_port: int, dicom_port: int, store_port: int, plugin: str) -> dict:
    """The configuration of a private test Orthanc: own storage, loopback only, no authentication, DICOMweb at
    ``/dicom-web/``, the tests' SCP declared with every DIMSE permission (C-FIND, C-GET, C-MOVE target, C-STORE)."""
    return {
        "Name": "LumbarBMD test PACS",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "StorageCompression": False,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # HTTP from 127.0.0.1 only
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": ORTHANC_AET,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomCheckModalityHost": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": False,  # only declared modalities: proves our AE title is sent
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomModalities": {
            "lumbarbmd": {
                "AET": STORE_SCP_AET, "Host": "127.0.0.1", "Port": store_port,
                "AllowEcho": True, "AllowFind": True, "AllowGet": True, "AllowMove": True, "AllowStore": True,
            },
        },
        "DicomScpTimeout": 30,
        "DicomAssociationCloseDelay": 0,  # close C-MOVE associations at once
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False},
        "ConcurrentJobs": 2,
        "StableAge": 2,
        "SaveJobs": False,
        "MaximumStorageSize": 0,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
        "KeepAlive": True,
        "HttpThreadsCount": 8,
    }


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_orthanc(folder: Path) -> tuple[subprocess.Popen, OrthancInstance]:
    """Write the configuration under ``folder``, start Orthanc and wait until ``/system`` answers."""
    if not (shutil.which(ORTHANC) or Path(ORTHANC).is_file()):
        pytest.fail(f"Orthanc is not installed ({ORTHANC} not found): {INSTALL_HINT}", pytrace=False)
    plugin = dicomweb_plugin()
    if plugin is None:
        pytest.fail(f"the Orthanc DICOMweb plugin is not installed (looked in {', '.join(DICOMWEB_PLUGIN_CANDIDATES)})"
                    f": {INSTALL_HINT}", pytrace=False)
    http_port, dicom_port, store_port = free_port(), free_port(), free_port()
    while len({http_port, dicom_port, store_port}) < 3:
        dicom_port, store_port = free_port(), free_port()
    config = folder / "orthanc.json"
    config.write_text(json.dumps(orthanc_config(folder, http_port, dicom_port, store_port, plugin), indent=2))
    log_path = folder / "orthanc.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([ORTHANC, "--no-jobs", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                   cwd=folder)
    atexit.register(stop_orthanc, process)  # also when the tests end without running the fixture's finaliser
    http_url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers(http_url + "/system"):
        if process.poll() is not None:
            pytest.fail(f"Orthanc exited at start (status {process.returncode}):\n{_log_tail(log_path)}", pytrace=False)
        if time.monotonic() > deadline:
            stop_orthanc(process)
            pytest.fail(f"Orthanc did not answer on {http_url}/system within {START_TIMEOUT_S:g} s:\n"
                        f"{_log_tail(log_path)}", pytrace=False)
        time.sleep(0.1)
    instance = OrthancInstance(http_url=http_url, dicomweb_url=http_url + "/dicom-web", host="127.0.0.1",
                               dicom_port=dicom_port, aet=ORTHANC_AET, store_aet=STORE_SCP_AET,
                               store_port=store_port, folder=folder, log_path=log_path)
    plugins = instance.rest("/plugins")
    if "dicom-web" not in (plugins or []):
        stop_orthanc(process)
        pytest.fail(f"Orthanc started without its DICOMweb plugin ({plugins}):\n{_log_tail(log_path)}", pytrace=False)
    return process, instance


def stop_orthanc(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Terminate Orthanc; kill it when it has not exited after ``grace_s``."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace_s)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancInstance]:
    """A running private Orthanc for the module's tests; stopped afterwards, whatever the tests did."""
    folder = tmp_path_factory.mktemp("orthanc")
    process, instance = start_orthanc(folder)
    try:
        yield instance
    finally:
        stop_orthanc(process)
