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


# --- the installer's rules (what to install, what is kept, what is said) -----------------------------------------

from LumbarBMDLib import dependencies as deps  # noqa: E402

SLICER_5_8 = {"numpy": "1.26.4", "SimpleITK": "2.4.0", "packaging": "24.1", "pydicom": "2.4.4"}


def test_a_fresh_slicer_installs_torch_apart_and_the_rest_with_pip_but_never_what_slicer_bundles():
    plan = deps.install_plan(installed=dict(SLICER_5_8))
    assert plan.problem is None and not plan.too_old_bundled
    assert str(plan.pytorch) == "torch>=2.1"
    names = [r.name for r in plan.pip]
    assert names == ["scipy", "scikit-image", "monai", "safetensors", "scikit-learn", "matplotlib", "tqdm", "zlib-ng"]
    assert not set(names) & set(deps.BUNDLED_WITH_SLICER) and "torch" not in names
    # the constraints file keeps every bundled package at the version Slicer ships; torch is not pinned (not there)
    lines = [line for line in plan.constraints.splitlines() if not line.startswith("#")]
    assert lines == ["numpy==1.26.4", "SimpleITK==2.4.0", "packaging==24.1", "pydicom==2.4.4"]


def test_an_installed_torch_is_pinned_so_that_resolving_monai_cannot_swap_its_build():
    installed = {**SLICER_5_8, "torch": "2.4.1+cu121"}
    plan = deps.install_plan(installed=installed)
    assert plan.pytorch is None  # 2.4.1+cu121 satisfies torch>=2.1
    assert "torch==2.4.1+cu121" in plan.constraints.splitlines()
    old = deps.install_plan(installed={**SLICER_5_8, "torch": "1.13.1"})
    assert str(old.pytorch) == "torch>=2.1" and "torch==" not in old.constraints  # it is replaced, so not pinned


def test_an_old_bundled_simpleitk_is_a_message_naming_the_slicer_to_install_not_an_upgrade():
    slicer_5_6 = {**SLICER_5_8, "SimpleITK": "2.2.1"}
    plan = deps.install_plan(installed=slicer_5_6)
    assert [str(r) for r in plan.too_old_bundled] == ["SimpleITK>=2.3"]
    assert "SimpleITK" not in [r.name for r in plan.to_install]
    assert "SimpleITK 2.2.1" in plan.problem and "3D Slicer 5.8 or later" in plan.problem
    assert "5.4" not in plan.problem and "never replaced" in plan.problem
    assert not plan.nothing_to_do


def test_everything_installed_means_nothing_to_do():
    installed = dict.fromkeys([r.split(">=")[0] for r in deps.RUNTIME_REQUIREMENTS], "99.0")
    plan = deps.install_plan(installed=installed)
    assert plan.nothing_to_do and plan.to_install == [] and plan.problem is None
    assert deps.install_plan().nothing_to_do  # this environment was installed from pyproject.toml


def test_installed_versions_are_read_from_metadata_without_importing():
    code = ("import sys; from LumbarBMDLib import dependencies as d; v = d.installed_versions(['torch', 'monai', "
            "'scipy', 'no-such-package-lumbarbmd']); print(v['no-such-package-lumbarbmd'], bool(v['torch']), "
            "sorted(m for m in d.HEAVY_MODULES if m in sys.modules))")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["None", "True", "[]"]


def test_restart_is_asked_only_when_a_loaded_package_changed():
    before = {"torch": "2.1.0", "monai": None, "scipy": "1.11.0", "scikit-image": "0.21.0"}
    after = {"torch": "2.4.1", "monai": "1.3.2", "scipy": "1.11.0", "scikit-image": "0.22.0"}
    changed = deps.changed_loaded_packages(before, after, loaded={"torch", "numpy"})
    assert changed == [("torch", "2.1.0", "2.4.1")]  # skimage changed but was not imported; monai is new
    assert deps.changed_loaded_packages(before, after, loaded={"skimage"}) == [("scikit-image", "0.21.0", "0.22.0")]
    message = deps.restart_message(changed)
    assert message.startswith("Restart 3D Slicer") and "torch 2.1.0 is loaded and 2.4.1 is now installed" in message
    assert deps.restart_message([]) is None
    assert deps.changed_loaded_packages(before, before, loaded={"torch"}) == []


def test_an_older_slicer_is_told_which_version_it_needs_in_words():
    assert deps.unsupported_slicer_message((5, 8, 1), (3, 9, 10)) is None
    assert deps.unsupported_slicer_message((5, 12, 3), (3, 12, 10)) is None
    for old in [(5, 6, 2), (5, 4, 0), (4, 11, 20210226)]:
        message = deps.unsupported_slicer_message(old, (3, 9, 10))
        assert message.startswith("Lumbar BMD needs 3D Slicer 5.8 or later (Python 3.9 or later)")
        assert f"this is Slicer {'.'.join(map(str, old))}" in message and "SimpleITK 2.2" in message
        assert "download.slicer.org" in message
    python38 = deps.unsupported_slicer_message(None, (3, 8, 18))
    assert python38.startswith("Lumbar BMD needs Python 3.9 or later") and "3.8.18" in python38
    assert deps.unsupported_slicer_message(None, (3, 9, 0)) is None


def test_torch_devices_are_only_asked_once_torch_is_loaded():
    import subprocess
    import sys

    code = ("import sys; from LumbarBMDLib import dependencies as d; print(d.torch_devices_if_loaded(), "
            "'torch' in sys.modules); import torch; print(len(d.torch_devices_if_loaded()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["None", "False", "3"]
