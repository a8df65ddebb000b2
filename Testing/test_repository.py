"""Repository rules that CI relies on: README ↔ .ci/run, the library's import boundary, the extension files."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    test_cmd = next(c for c in _readme_commands() if "pytest" in c and c.startswith("python3 -m venv"))
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_cmd in [line.strip() for line in ci]


def test_readme_main_command_runs_the_demo_and_pins_torch():
    main_cmd = next(c for c in _readme_commands() if c.endswith("lumbarbmd demo"))
    assert "torch==2.13.0" in main_cmd and main_cmd.startswith("python3 -m venv .venv")
    test_cmd = next(c for c in _readme_commands() if "pytest" in c and c.startswith("python3 -m venv"))
    assert "torch==2.13.0" in test_cmd


def test_top_level_layout():
    for name in (
        "CMakeLists.txt",
        "README.md",
        "LumbarBMD",
        "LumbarBMDLib",
        "Resources",
        "Testing",
        "pyproject.toml",
        ".ci/run",
    ):
        assert (ROOT / name).exists(), name


def test_pyproject_extras_and_script():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert meta["scripts"]["lumbarbmd"] == "LumbarBMDLib.cli:main"
    assert "slicer-core==5.13.31053.0" in meta["optional-dependencies"]["slicer"]
    dev = " ".join(meta["optional-dependencies"]["dev"])
    for pkg in ("pytest", "hypothesis", "ruff"):
        assert pkg in dev


def test_library_never_imports_slicer_qt_vtk():
    forbidden = {"slicer", "qt", "ctk", "vtk", "vtkmodules"}
    for path in (ROOT / "LumbarBMDLib").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path}: imports {name}"


def test_no_pickle_loading():
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts:
            continue
        for match in re.finditer(r"torch\.load\((.*)\)", path.read_text(encoding="utf-8")):
            assert "weights_only=True" in match.group(1), f"{path}: torch.load without weights_only=True"


def test_library_data_files_ship_with_the_wheel_and_the_extension():
    """Every data file inside LumbarBMDLib (not Python) is package data in pyproject.toml (the wheel) and matched by
    the Slicer module's CMake glob for LumbarBMDLib's data (the extension); today only JSON tables and py.typed."""
    data = sorted(p.relative_to(ROOT / "LumbarBMDLib").as_posix() for p in (ROOT / "LumbarBMDLib").rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts)
    assert "internal_calibration/response_table.json" in data
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"]["LumbarBMDLib"]
    assert set(data) <= set(package_data), set(data) - set(package_data)
    cmake = (ROOT / "LumbarBMD" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "${LumbarBMDLib_SOURCE_DIR}/*.json" in cmake
    assert all(name == "py.typed" or name.endswith(".json") for name in data), data
