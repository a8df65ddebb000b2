"""Where a PACS is and how to speak to it: :class:`PacsServer`, parsed from a URL-like string.

Accepted forms (``parse_server``):

- ``http://host:8042/dicom-web``, ``https://host/dicom-web``: DICOMweb (QIDO-RS, WADO-RS, STOW-RS) at that base URL;
- ``dicomweb+http://host:8042/dicom-web``, ``dicomweb+https://…``: the same, with the protocol said explicitly;
- ``dimse://ORTHANC@host:4242``: DIMSE (C-FIND, C-GET or C-MOVE, C-STORE) with the PACS's called AE title
  ``ORTHANC``. Query parameters: ``aet=LUMBARBMD`` (our calling AE title, default ``LUMBARBMD``),
  ``retrieve=get|move`` (default ``get``), ``store_port=11112`` (where our storage SCP listens for C-MOVE; the PACS
  must know our AE title with that host and port), ``timeout=30`` (seconds).

A user name and password in a DICOMweb URL (``https://user:secret@host/dicom-web``) are sent as HTTP basic
authentication and never shown in :meth:`PacsServer.describe` or in results.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from LumbarBMDLib.errors import LumbarBMDError

DEFAULT_AET = "LUMBARBMD"
DEFAULT_DIMSE_PORT = 104
DEFAULT_TIMEOUT_S = 30.0
_AE_TITLE = re.compile(r"^[ -~]{1,16}$")  # 1–16 printable ASCII characters, no backslash (checked separately)


@dataclass(frozen=True)
class PacsServer:
    """A PACS: a DICOMweb base URL, or a DIMSE host/port/called AE title, plus our own AE title.

    ``protocol`` is ``"dicomweb"`` or ``"dimse"``. ``retrieve`` (DIMSE) is ``"get"`` (C-GET, one association, no
    port to open) or ``"move"`` (C-MOVE to our storage SCP on ``store_port``).
    """

    protocol: str
    url: str = ""  # DICOMweb base URL without credentials, e.g. http://host:8042/dicom-web
    host: str = ""
    port: int = 0
    called_aet: str = ""
    calling_aet: str = DEFAULT_AET
    retrieve: str = "get"
    store_port: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    username: str = ""
    password: str = ""

    def describe(self) -> str:
        """The server as a URL-like string without any password (for logs and results.json)."""
        if self.protocol == "dicomweb":
            return self.url
        extra = f"?aet={self.calling_aet}"
        if self.retrieve == "move":
            extra += f"&retrieve=move&store_port={self.store_port}"
        return f"dimse://{self.called_aet}@{self.host}:{self.port}{extra}"


def _check_aet(aet: str, what: str) -> str:
    if not _AE_TITLE.match(aet) or "\\" in aet or not aet.strip():
        raise LumbarBMDError(f"{what} '{aet}' is not a valid DICOM AE title (1 to 16 letters, digits or spaces)")
    return aet.strip()


def _number(text: str, what: str, spec: str, kind: type = int):
    try:
        value = kind(text)
    except ValueError:
        raise LumbarBMDError(f"the {what} in the PACS address {spec} is not a number: '{text}'") from None
    if value <= 0:
        raise LumbarBMDError(f"the {what} in the PACS address {spec} must be positive: '{text}'")
    return value


def parse_server(spec: str) -> PacsServer:
    """Parse a PACS address (see the module docstring for the forms); raises a sentence when it is not one."""
    spec = spec.strip()
    parts = urlsplit(spec)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https", "dicomweb+http", "dicomweb+https", "dicomweb"):
        http = scheme.removeprefix("dicomweb+") if scheme != "dicomweb" else "http"
        if not parts.hostname:
            raise LumbarBMDError(f"the DICOMweb address {spec} names no host (e.g. http://pacs:8042/dicom-web)")
        netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        if parts.port:
            netloc += f":{parts.port}"
        url = urlunsplit((http, netloc, parts.path.rstrip("/"), "", ""))
        return PacsServer(protocol="dicomweb", url=url, username=parts.username or "", password=parts.password or "",
                          timeout_s=DEFAULT_TIMEOUT_S)
    if scheme == "dimse":
        if not parts.hostname:
            raise LumbarBMDError(f"the DIMSE address {spec} names no host (e.g. dimse://ORTHANC@pacs:4242)")
        if not parts.username:
            raise LumbarBMDError(f"the DIMSE address {spec} names no called AE title: write it before the host, "
                                 "e.g. dimse://ORTHANC@pacs:4242")
        try:
            port = parts.port or DEFAULT_DIMSE_PORT
        except ValueError:
            raise LumbarBMDError(f"the port in the PACS address {spec} is not a number") from None
        params = {k.lower(): v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(params) - {"aet", "retrieve", "store_port", "timeout"}
        if unknown:
            raise LumbarBMDError(f"unknown option(s) {', '.join(sorted(unknown))} in the PACS address {spec}; "
                                 "known: aet, retrieve, store_port, timeout")
        retrieve = params.get("retrieve", "get").lower()
        if retrieve not in ("get", "move"):
            raise LumbarBMDError(f"retrieve={retrieve} in the PACS address {spec}: use retrieve=get (C-GET) or "
                                 "retrieve=move (C-MOVE)")
        store_port = _number(params["store_port"], "store_port", spec) if "store_port" in params else 0
        if retrieve == "move" and not store_port:
            raise LumbarBMDError(f"C-MOVE needs the port of our storage SCP: add store_port=PORT to {spec} (the PACS "
                                 "must know our AE title at this host and port)")
        timeout = _number(params["timeout"], "timeout", spec, float) if "timeout" in params else DEFAULT_TIMEOUT_S
        return PacsServer(protocol="dimse", host=parts.hostname, port=port,
                          called_aet=_check_aet(unquote(parts.username), "the called AE title"),
                          calling_aet=_check_aet(params.get("aet", DEFAULT_AET), "our AE title (aet=)"),
                          retrieve=retrieve, store_port=store_port, timeout_s=timeout)
    raise LumbarBMDError(f"'{spec}' is not a PACS address: use http(s)://host:port/dicom-web (DICOMweb) or "
                         "dimse://AET@host:port (DIMSE)")
