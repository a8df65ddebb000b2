"""DICOM outputs linked to the source study (issue 16): a classic CT series writer, the source series' headers,
a DICOM SEG of L1–L4 and their trabecular ROIs, and a TID 1500 Measurement Report (SR) of the BMDs.

Modules, by role:

* :mod:`~LumbarBMDLib.dicom.ct_series` — :func:`write_ct_series`: a CT volume as a classic CT Image Storage series
  (tests, PACS tests, phantoms for a PACS).
* :mod:`~LumbarBMDLib.dicom.source` — :func:`read_source_series`: the headers of the series a case was measured on,
  in the slice order of the :class:`~LumbarBMDLib.volume.CTVolume`, checked against its geometry.
* :mod:`~LumbarBMDLib.dicom.codes` — every code the SEG and SR use, in one place.
* :mod:`~LumbarBMDLib.dicom.masks` — the sagittal labels and the trabecular patches mapped onto the source frames.
* :mod:`~LumbarBMDLib.dicom.seg` — :func:`build_seg`: the DICOM Segmentation (BINARY).
* :mod:`~LumbarBMDLib.dicom.sr` — :func:`build_sr`: the Comprehensive 3D SR, TID 1500 Measurement Report.
* :mod:`~LumbarBMDLib.dicom.files` — :func:`save_dicom_file`: one DICOM file, written atomically (the outputs, and
  the series retrieved over WADO-RS).
* :mod:`~LumbarBMDLib.dicom.outputs` — :func:`write_dicom_outputs`: ``seg.dcm`` and ``sr.dcm`` of one case.

This package never imports ``slicer``, ``qt`` or ``vtk``; highdicom and pydicom are imported by the modules that
need them (the ``archive`` extra).
"""

from __future__ import annotations

SEG_FILE = "seg.dcm"
SR_FILE = "sr.dcm"

__all__ = ["SEG_FILE", "SR_FILE"]
