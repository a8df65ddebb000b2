"""Studies from a PACS in, results back: query (QIDO-RS or C-FIND), choose the series to measure, retrieve it
(WADO-RS, C-GET or C-MOVE) into a resumable cache, and send DICOM results back (STOW-RS or C-STORE).

- :mod:`.server` — :class:`PacsServer` and :func:`parse_server` (``http(s)://…/dicom-web``, ``dimse://AET@host:port``)
- :mod:`.query` — :class:`StudyQuery`, :class:`StudyInfo`, :class:`SeriesInfo`
- :mod:`.client` — :func:`find_studies`, :func:`find_series`, :func:`retrieve_series`, :func:`store_files`
- :mod:`.selection` — :func:`choose_series` and the kernel table
- :mod:`.fetch` — :func:`fetch_studies`, :func:`send_files`, and the batch's :func:`pacs_inputs`, :func:`send_back`

Never imports slicer, qt or vtk; pydicom, pynetdicom and dicomweb-client are imported here (the ``archive`` extra).
"""

from LumbarBMDLib.pacs.client import find_series, find_studies, retrieve_series, store_files
from LumbarBMDLib.pacs.fetch import FetchedStudy, fetch_studies, pacs_inputs, send_back, send_files
from LumbarBMDLib.pacs.query import SeriesInfo, StudyInfo, StudyQuery
from LumbarBMDLib.pacs.selection import KERNEL_TABLE, SeriesChoice, choose_series, classify_kernel
from LumbarBMDLib.pacs.server import PacsServer, parse_server

__all__ = [
    "KERNEL_TABLE", "FetchedStudy", "PacsServer", "SeriesChoice", "SeriesInfo", "StudyInfo", "StudyQuery",
    "choose_series", "classify_kernel", "fetch_studies", "find_series", "find_studies", "pacs_inputs",
    "parse_server", "retrieve_series", "send_back", "send_files", "store_files",
]
