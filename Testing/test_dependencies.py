"""The first-use dependency check of the Slicer module and the device list it shows."""

from __future__ import annotations

from pathlib import Path

import tomllib
import torch

from LumbarBMDLib.dependencies import RUNTIME_REQUIREMENTS, missing_requirements, torch_devices


def test_runtime_requirements_are_those_of_pyproject():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    assert list(RUNTIME_REQUIREMENTS) == pyproject["project"]["dependencies"]


def test_everything_is_installed_here_and_missing_or_old_packages_are_found():
    assert missing_requirements() == []  # this environment was installed from pyproject.toml
    missing = missing_requirements(("numpy>=1.0", "numpy>=999", "no-such-package-lumbarbmd>=1", "SimpleITK"))
    assert [str(r) for r in missing] == ["numpy>=999", "no-such-package-lumbarbmd>=1"]


def test_torch_devices_say_what_torch_sees():
    choices = {c.device: c for c in torch_devices()}
    assert list(choices) == ["auto", "cpu", "cuda"]
    assert choices["cpu"].available and choices["auto"].available
    assert choices["cuda"].available == torch.cuda.is_available()
    if torch.cuda.is_available():
        assert torch.cuda.get_device_name(0) in choices["cuda"].label and choices["auto"].label == "auto (GPU)"
    else:
        assert choices["cuda"].label.startswith("GPU: none") and choices["auto"].label == "auto (CPU)"


def test_packages_that_come_with_slicer_are_runtime_requirements():
    """The module never pip-installs these into Slicer; they must still be checked (an old Slicer is an error)."""
    from LumbarBMDLib.dependencies import BUNDLED_WITH_SLICER

    names = {r.split(">=")[0] for r in RUNTIME_REQUIREMENTS}
    assert set(BUNDLED_WITH_SLICER) <= names
