"""Fixtures for testing the Slicer module on a real ``slicer-core`` MRML scene (no Slicer application).

Import them into a test file (``from slicer_fixtures import lumbarbmd_module, mrml, vtk_messages``);
pytest's default ``prepend`` import mode puts ``Testing/`` on ``sys.path``.

* ``mrml``: a fresh scene with application, colour, volumes, segmentations and subject hierarchy logics,
  set as the global ``slicer.mrmlScene`` with a ``slicer.modules`` shim. The test fails if VTK reported
  an ERROR, unless it requests ``allow_vtk_errors`` (the pattern of
  ``shared/reference/slicer-core/test_slicer_core_probe.py``).
* ``lumbarbmd_module``: ``LumbarBMD/LumbarBMD.py`` imported fresh, with a stand-in for
  ``slicer.ScriptedLoadableModule`` (which the wheel lacks because it needs Qt).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import unittest
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel")
vtk = pytest.importorskip("vtk")

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO_ROOT / "LumbarBMD"
MODULE_FILE = MODULE_DIR / "LumbarBMD.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "LumbarBMD.ui"


def make_scripted_loadable_module_stub() -> types.ModuleType:
    """A ``slicer.ScriptedLoadableModule`` without Qt: the four base classes, reduced to what runs headless.

    They mirror Slicer's ``Base/Python/slicer/ScriptedLoadableModule.py``: the module base stores the
    parent and resets its metadata; the logic base finds or creates its singleton parameter node in
    ``slicer.mrmlScene``; the test base is a ``unittest.TestCase``. The widget base is a plain class
    (the widget needs Qt and is not tested here).
    """
    stub = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = type(self).__name__
            parent.title = ""
            parent.categories = []
            parent.dependencies = []
            parent.contributors = []
            parent.helpText = ""
            parent.acknowledgementText = ""

        def resourcePath(self, filename):
            return os.path.join(os.path.dirname(self.parent.path), "Resources", filename)

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__.removesuffix("Widget")
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__.removesuffix("Logic")
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node:
                if node.GetAttribute("ModuleName") != self.moduleName:
                    node.SetAttribute("ModuleName", self.moduleName)
                return node
            return slicer.mrmlScene.AddNode(self.createParameterNode())

        def createParameterNode(self):
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def runTest(self):
            pass

    stub.ScriptedLoadableModule = ScriptedLoadableModule
    stub.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    stub.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    stub.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    stub.__all__ = [
        "ScriptedLoadableModule",
        "ScriptedLoadableModuleLogic",
        "ScriptedLoadableModuleTest",
        "ScriptedLoadableModuleWidget",
    ]
    return stub


def import_module_file(path: Path = MODULE_FILE, name: str = "LumbarBMD") -> types.ModuleType:
    """Execute ``path`` as a fresh module ``name`` (registered in ``sys.modules`` by the caller)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@pytest.fixture
def vtk_messages():
    """Collect VTK error/warning text (VTK logs to its output window but never raises)."""
    previous = vtk.vtkOutputWindow.GetInstance()
    window = vtk.vtkStringOutputWindow()
    vtk.vtkOutputWindow.SetInstance(window)
    yield window
    vtk.vtkOutputWindow.SetInstance(previous)


@pytest.fixture
def allow_vtk_errors():
    """Request this fixture in tests that expect VTK ERROR messages."""
    return True


def new_mrml_env() -> types.SimpleNamespace:
    """A fresh scene with application, colour, volumes, segmentations and subject hierarchy logics."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = app_logic.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", colors)

    def register(logic, name):
        logic.SetMRMLApplicationLogic(app_logic)  # before SetMRMLScene
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(name, logic)
        return logic

    env = types.SimpleNamespace(scene=scene, app_logic=app_logic, colors=colors)
    env.volumes = register(slicer.vtkSlicerVolumesLogic(), "Volumes")
    env.segmentations = register(slicer.vtkSlicerSegmentationsModuleLogic(), "Segmentations")
    env.subject_hierarchy = register(slicer.vtkSlicerSubjectHierarchyModuleLogic(), "SubjectHierarchy")
    return env


def use_scene(monkeypatch, env: types.SimpleNamespace) -> None:
    """Make ``env``'s scene the global ``slicer.mrmlScene``, with the ``slicer.modules`` shim ``slicer.util`` needs."""
    monkeypatch.setattr(slicer, "mrmlScene", env.scene, raising=False)
    monkeypatch.setattr(
        slicer,
        "modules",
        types.SimpleNamespace(
            volumes=types.SimpleNamespace(logic=lambda: env.volumes),
            segmentations=types.SimpleNamespace(logic=lambda: env.segmentations),
        ),
        raising=False,
    )


@pytest.fixture
def mrml(monkeypatch, vtk_messages, request):
    """Fresh scene + application logic + the module logics ``slicer.util`` expects."""
    env = new_mrml_env()
    use_scene(monkeypatch, env)
    yield env
    env.scene.Clear(True)
    if "allow_vtk_errors" not in request.fixturenames:
        assert "ERROR" not in vtk_messages.GetOutput(), vtk_messages.GetOutput()


@pytest.fixture
def scripted_module_stub(monkeypatch):
    """Install the ``slicer.ScriptedLoadableModule`` stand-in for the duration of a test."""
    stub = make_scripted_loadable_module_stub()
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", stub)
    return stub


@pytest.fixture
def lumbarbmd_module(scripted_module_stub):
    """``LumbarBMD/LumbarBMD.py`` freshly imported as module ``LumbarBMD`` (removed again afterwards)."""
    previous = sys.modules.pop("LumbarBMD", None)
    try:
        yield import_module_file()
    finally:
        sys.modules.pop("LumbarBMD", None)
        if previous is not None:
            sys.modules["LumbarBMD"] = previous
