"""One DICOM file written: the Part 10 layout (preamble, file meta), atomically, with pydicom 3 or 2."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from LumbarBMDLib.durable import TMP_MARK


def save_dicom_file(ds, path: str | Path) -> Path:
    """Write the pydicom ``Dataset`` ``ds`` to ``path`` through a temporary sibling renamed into place, so that
    ``path`` is complete or absent (never a truncated file a reader would take for a damaged slice)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    os.close(fd)
    try:
        try:
            ds.save_as(tmp, enforce_file_format=True)
        except TypeError:  # pydicom 2: no enforce_file_format
            ds.save_as(tmp, write_like_original=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
