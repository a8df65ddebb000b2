"""What LumbarBMD needs at run time, what of it is missing, and which devices torch sees.

Used by the Slicer module to install its dependencies on first use (with confirmation) and to fill its device
selector. Nothing here imports torch at module import time: :func:`missing_requirements` only reads installed
package metadata, and :func:`torch_devices` imports torch when called.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from packaging.requirements import Requirement
from packaging.version import Version

#: The runtime requirements, as in ``pyproject.toml``'s ``[project] dependencies`` (a test keeps them equal).
#: Inside Slicer, numpy and SimpleITK come with the application; the others are installed on first use.
RUNTIME_REQUIREMENTS: tuple[str, ...] = (
    "numpy>=1.24",
    "scipy>=1.10",
    "SimpleITK>=2.3",
    "scikit-image>=0.21",
    "torch>=2.1",
    "monai>=1.3",
    "safetensors>=0.4",
    "scikit-learn>=1.3",
    "matplotlib>=3.7",
    "tqdm>=4.65",
    "packaging>=21",
    "pydicom>=2.4",  # each DICOM slice's pixel data checked against its header (a cut file is refused)
    "zlib-ng>=0.4",  # .nii.gz inflated (and checked whole) as fast as ITK reads it; plain zlib if absent
)
#: Shipped with 3D Slicer: never pip-installed into Slicer's Python (replacing them would break Slicer itself).
BUNDLED_WITH_SLICER: tuple[str, ...] = ("numpy", "SimpleITK", "packaging", "pydicom")


def missing_requirements(requirements: tuple[str, ...] = RUNTIME_REQUIREMENTS) -> list[Requirement]:
    """The requirements that are not installed, or installed in a version outside their specifier (in order)."""
    missing = []
    for text in requirements:
        req = Requirement(text)
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(req)
            continue
        if not req.specifier.contains(Version(version).base_version, prereleases=True):
            missing.append(req)
    return missing


@dataclass(frozen=True)
class DeviceChoice:
    """An entry of a device selector: ``device`` is what ``--device`` / the models accept; ``label`` is for people."""

    device: str
    label: str
    available: bool


def torch_devices() -> list[DeviceChoice]:
    """auto / CPU / GPU as torch sees them now (imports torch).

    The GPU entry names the first CUDA device and its memory, or says why there is none (a CPU-only torch build,
    or no GPU visible); "auto" says what it will pick.
    """
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GB)"
        if torch.cuda.device_count() > 1:
            gpu += f", first of {torch.cuda.device_count()}"
        cuda = True
    else:
        cuda = False
        gpu = "GPU: none (CPU-only torch build)" if torch.version.cuda is None else "GPU: none visible to torch"
    return [
        DeviceChoice("auto", f"auto ({'GPU' if cuda else 'CPU'})", True),
        DeviceChoice("cpu", "CPU", True),
        DeviceChoice("cuda", gpu, cuda),
    ]
