"""What LumbarBMD needs at run time, what of it is missing, how to install it into Slicer, and which devices torch sees.

The Slicer module asks this module, never Slicer, *what* to do; it only carries it out (dialogs, pip, the PyTorch
extension). Everything here is plain Python (no ``slicer``, ``qt`` or ``vtk``), so that the rules are tested with
pytest:

- **Supported Slicer.** 3D Slicer 5.8 or later (Python 3.9 or later): Slicer 5.4 and 5.6 bundle SimpleITK 2.2, older
  than the SimpleITK 2.3 the library reads CTs with, and SimpleITK comes with Slicer and is never replaced.
  :func:`unsupported_slicer_message` says so in words when the module is opened in an older Slicer.
- **Nothing heavy at import or when the module is entered.** :func:`missing_requirements` reads installed package
  metadata only; torch is imported by :func:`torch_devices`, which the module calls only once torch is loaded
  (:func:`torch_devices_if_loaded`), i.e. after the first computation.
- **Installing keeps Slicer's own packages.** :func:`install_plan` never installs a package that Slicer bundles
  (:data:`BUNDLED_WITH_SLICER`; an old one is a message, not an upgrade), installs torch through the PyTorch extension
  when it is present, and pins what Slicer bundles (and a torch already installed) in a pip constraints file
  (:func:`constraints_text`), so that resolving MONAI or scikit-image cannot replace them.
- **Restart when a loaded package changed.** :func:`changed_loaded_packages` and :func:`restart_message` tell when a
  package already imported in this session (torch above all) was replaced: the old version stays in memory until
  Slicer restarts.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

#: The oldest 3D Slicer and Python the module supports (see the module docstring for why).
SLICER_MINIMUM: tuple[int, int] = (5, 8)
PYTHON_MINIMUM: tuple[int, int] = (3, 9)
SUPPORT_REASON = ("Slicer 5.4 and 5.6 come with SimpleITK 2.2, older than the SimpleITK 2.3 that Lumbar BMD reads CTs "
                  "with, and SimpleITK is part of Slicer (it is never replaced)")
DOWNLOAD_URL = "https://download.slicer.org"

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
#: Shipped with 3D Slicer: never pip-installed or upgraded into Slicer's Python (replacing them would break Slicer
#: itself: its DICOM browser, its SimpleITK filters, numpy's C API under VTK), and pinned while anything is installed.
BUNDLED_WITH_SLICER: tuple[str, ...] = ("numpy", "SimpleITK", "packaging", "pydicom")
#: Installed through the PyTorch extension (``PyTorchUtils``, which picks the build that matches the GPU driver) when
#: it is there, with pip otherwise; pinned once installed, so that MONAI's resolver cannot swap the build.
PYTORCH = "torch"
#: Import names of the requirements whose distribution is named otherwise (the rest import under their own name).
IMPORT_NAMES: dict[str, str] = {"scikit-image": "skimage", "scikit-learn": "sklearn", "zlib-ng": "zlib_ng"}
#: Modules that are slow to import or initialise a GPU: imported only when a computation needs them.
HEAVY_MODULES: tuple[str, ...] = ("torch", "monai", "scipy", "matplotlib", "skimage", "sklearn")


def _key(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def installed_versions(names: Iterable[str]) -> dict[str, str | None]:
    """``{name: installed version or None}`` from the installed packages' metadata (nothing is imported)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _satisfies(req: Requirement, version: str | None) -> bool:
    if version is None:
        return False
    try:
        base = Version(version).base_version  # "2.4.1+cu121" is 2.4.1
    except InvalidVersion:
        return False
    return req.specifier.contains(base, prereleases=True)


def missing_requirements(requirements: Iterable[str] = RUNTIME_REQUIREMENTS,
                         installed: Mapping[str, str | None] | None = None) -> list[Requirement]:
    """The requirements that are not installed, or installed in a version outside their specifier (in order).

    ``installed`` (``{name: version or None}``) replaces the lookup of the installed packages' metadata.
    """
    reqs = [Requirement(text) for text in requirements]
    if installed is None:
        installed = installed_versions(r.name for r in reqs)
    found = {_key(k): v for k, v in installed.items()}
    return [r for r in reqs if not _satisfies(r, found.get(_key(r.name)))]


@dataclass(frozen=True)
class InstallPlan:
    """What the Slicer module installs on first use, and how.

    pytorch: torch, when it is missing or too old (through the PyTorch extension when present, else with pip).
    pip: the other missing requirements, installed with pip under ``constraints``.
    too_old_bundled: requirements on packages that come with Slicer and are too old or absent; they are never
        installed, and ``problem`` says what to do instead.
    constraints: the text of a pip constraints file pinning the packages Slicer bundles, and torch when it is
        already installed and good.
    """

    pytorch: Requirement | None = None
    pip: tuple[Requirement, ...] = ()
    too_old_bundled: tuple[Requirement, ...] = ()
    constraints: str = ""
    problem: str | None = None
    installed: dict = field(default_factory=dict)

    @property
    def to_install(self) -> list[Requirement]:
        return ([self.pytorch] if self.pytorch is not None else []) + list(self.pip)

    @property
    def nothing_to_do(self) -> bool:
        return not self.to_install and self.problem is None


def constraints_text(installed: Mapping[str, str | None], pin_torch: bool = True) -> str:
    """A pip constraints file (``name==version`` lines) that keeps the packages Slicer bundles at their installed
    version, and torch too when ``pin_torch`` and it is installed. Packages that are not installed are not pinned."""
    found = {_key(k): (k, v) for k, v in installed.items()}
    names = list(BUNDLED_WITH_SLICER) + ([PYTORCH] if pin_torch else [])
    lines = ["# Written by Lumbar BMD: keep what 3D Slicer bundles (and the installed PyTorch build) as they are."]
    for name in names:
        _, version = found.get(_key(name), (name, None))
        if version:
            lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def too_old_bundled_message(reqs: Iterable[Requirement], installed: Mapping[str, str | None]) -> str:
    """The sentence for packages that come with Slicer and are too old: they are not replaced; a newer Slicer is."""
    found = {_key(k): v for k, v in installed.items()}
    parts = []
    for r in reqs:
        version = found.get(_key(r.name))
        parts.append(f"{r.name} {version} (Lumbar BMD needs {r})" if version else f"no {r.name} (Lumbar BMD needs {r})")
    minimum = ".".join(map(str, SLICER_MINIMUM))
    return (f"this Slicer has {', '.join(parts)}. These packages come with 3D Slicer and are never replaced by the "
            f"module: install 3D Slicer {minimum} or later from {DOWNLOAD_URL}")


def install_plan(requirements: Iterable[str] = RUNTIME_REQUIREMENTS,
                 installed: Mapping[str, str | None] | None = None) -> InstallPlan:
    """What to install for ``requirements`` given the ``installed`` versions (read from the metadata if None)."""
    reqs = [Requirement(text) for text in requirements]
    names = [r.name for r in reqs] + [n for n in BUNDLED_WITH_SLICER if n not in {r.name for r in reqs}]
    installed = dict(installed_versions(names) if installed is None else installed)
    missing = missing_requirements([str(r) for r in reqs], installed)
    bundled = {_key(n) for n in BUNDLED_WITH_SLICER}
    too_old = tuple(r for r in missing if _key(r.name) in bundled)
    pytorch = next((r for r in missing if _key(r.name) == PYTORCH), None)
    pip = tuple(r for r in missing if _key(r.name) not in bundled and _key(r.name) != PYTORCH)
    return InstallPlan(
        pytorch=pytorch, pip=pip, too_old_bundled=too_old,
        constraints=constraints_text(installed, pin_torch=pytorch is None),
        problem=too_old_bundled_message(too_old, installed) if too_old else None,
        installed=installed,
    )


def changed_loaded_packages(before: Mapping[str, str | None], after: Mapping[str, str | None],
                            loaded: Iterable[str] | None = None) -> list[tuple[str, str | None, str | None]]:
    """``(name, version before, version after)`` of the packages whose version changed while one of their modules
    was already imported (``loaded``: module names, ``sys.modules`` by default): the old code stays in memory."""
    loaded = set(sys.modules if loaded is None else loaded)
    changed = []
    for name, old in before.items():
        new = after.get(name)
        if old is None or old == new:  # freshly installed packages were not loaded
            continue
        module = IMPORT_NAMES.get(name, name)
        if module in loaded:
            changed.append((name, old, new))
    return changed


def restart_message(changed: Iterable[tuple[str, str | None, str | None]]) -> str | None:
    """The restart prompt for :func:`changed_loaded_packages`, or None when nothing loaded changed."""
    changed = list(changed)
    if not changed:
        return None
    what = "; ".join(f"{name} {old} is loaded and {new or 'another version'} is now installed"
                     for name, old, new in changed)
    return (f"Restart 3D Slicer before using Lumbar BMD: {what}. The version that is loaded stays in memory until "
            "Slicer restarts, and mixing the two can fail or give wrong results.")


def _version_text(version: Iterable[int]) -> str:
    return ".".join(str(v) for v in version)


def unsupported_slicer_message(slicer_version: tuple[int, ...] | None,
                               python_version: tuple[int, ...] = tuple(sys.version_info[:3])) -> str | None:
    """None in a supported Slicer; otherwise a sentence saying which Slicer (and Python) the module needs and why.

    ``slicer_version`` is (major, minor[, patch]); None when unknown (the Python version is still checked).
    """
    minimum = _version_text(SLICER_MINIMUM)
    python_minimum = _version_text(PYTHON_MINIMUM)
    if slicer_version is not None and tuple(slicer_version[:2]) < SLICER_MINIMUM:
        return (f"Lumbar BMD needs 3D Slicer {minimum} or later (Python {python_minimum} or later); this is Slicer "
                f"{_version_text(slicer_version)} with Python {_version_text(python_version)}. {SUPPORT_REASON}. "
                f"Install 3D Slicer {minimum} or later from {DOWNLOAD_URL}.")
    if tuple(python_version[:2]) < PYTHON_MINIMUM:
        return (f"Lumbar BMD needs Python {python_minimum} or later, as in 3D Slicer {minimum} and later; this Python "
                f"is {_version_text(python_version)}. Install 3D Slicer {minimum} or later from {DOWNLOAD_URL}.")
    return None


@dataclass(frozen=True)
class DeviceChoice:
    """An entry of a device selector: ``device`` is what ``--device`` / the models accept; ``label`` is for people."""

    device: str
    label: str
    available: bool


#: The device selector's entries before torch is loaded (torch is not imported just to fill a list).
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
TORCH_NOT_LOADED = "GPU: shown after the first computation (PyTorch is loaded when it is needed)"
TORCH_NOT_INSTALLED = "PyTorch is not installed yet: it is installed on first use."


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


def torch_devices_if_loaded() -> list[DeviceChoice] | None:
    """:func:`torch_devices` when torch is already imported; None otherwise (torch is then not imported: entering
    the module must not load torch or initialise CUDA)."""
    return torch_devices() if PYTORCH in sys.modules else None
