"""LumbarBMD: lumbar bone mineral density (QCT-equivalent, mg/cm³) from routine CT.

The package never imports ``slicer``, ``qt`` or ``vtk``; it works the same from 3D Slicer, the
``lumbarbmd`` command line and a notebook. One module per pipeline stage (see DESIGN.md).
"""

from __future__ import annotations

from LumbarBMDLib.errors import LumbarBMDError

__version__ = "0.4.0"

__all__ = ["LumbarBMDError", "__version__"]
