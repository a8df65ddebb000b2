"""The Slicer module (LumbarBMD/LumbarBMD.py) on a real slicer-core MRML scene, without the Slicer application.

The Logic is the MRML adapter: CTVolume (LPS) <-> volume node (RAS). These tests check that conversion
against a real scene, a real NRRD writer/reader and SimpleITK; plus static checks of the .ui file and the
module metadata.
"""

# The fixtures are imported from slicer_fixtures and requested by name as test arguments:
# ruff: noqa: F811

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk
from slicer_fixtures import (  # noqa: F401  (fixtures are used by name)
    MODULE_DIR,
    MODULE_FILE,
    REPO_ROOT,
    UI_FILE,
    allow_vtk_errors,
    lumbarbmd_module,
    mrml,
    scripted_module_stub,
    vtk_messages,
)

from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.volume import CTVolume

pytestmark = pytest.mark.slicer

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SHAPE = (6, 7, 9)  # numpy (k, j, i)
SPACING = (0.7, 0.8, 2.5)
ORIGIN_LPS = (-100.0, -120.0, 50.0)


def oblique_direction(degrees: float) -> np.ndarray:
    """Rotation by ``degrees`` about S, then about L: every index axis is oblique."""
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    about_s = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    about_l = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return about_l @ about_s


GEOMETRIES = {
    "axis-aligned": np.eye(3),
    "oblique-30deg": oblique_direction(30.0),
    "flipped-axes": np.diag([-1.0, 1.0, -1.0]) @ oblique_direction(30.0),  # left-handed index frame
}


def make_ct(direction: np.ndarray, dtype=np.int16, seed: int = 7) -> CTVolume:
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1024, 1800, size=SHAPE).astype(dtype)
    return CTVolume(hu=hu, spacing=SPACING, origin=ORIGIN_LPS, direction=direction, source="test")


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def assert_same_geometry(a: CTVolume, b: CTVolume) -> None:
    np.testing.assert_allclose(a.spacing, b.spacing, atol=1e-9)
    np.testing.assert_allclose(a.origin, b.origin, atol=1e-9)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-9)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-9)


# --------------------------------------------------------------------------------------
# (a) headless import
# --------------------------------------------------------------------------------------
def test_module_imports_headless_and_logic_works_without_qt(lumbarbmd_module, mrml):
    assert lumbarbmd_module.qt is None and lumbarbmd_module.ctk is None
    for name in ("LumbarBMD", "LumbarBMDWidget", "LumbarBMDLogic", "LumbarBMDTest"):
        assert isinstance(getattr(lumbarbmd_module, name), type)
    logic = lumbarbmd_module.LumbarBMDLogic()
    assert logic.moduleName == "LumbarBMD"
    parameter_node = logic.getParameterNode().parameterNode
    assert parameter_node is logic.getParameterNode().parameterNode  # singleton
    assert parameter_node.GetAttribute("ModuleName") == "LumbarBMD"
    assert mrml.scene.GetSingletonNode("LumbarBMD", "vtkMRMLScriptedModuleNode") is parameter_node


def test_module_import_pulls_in_neither_qt_nor_torch():
    """In a fresh interpreter: importing the module and creating its module, logic and parameter node loads no Qt, no
    torch and none of the packages installed on first use (so the module loads in a fresh Slicer and can offer to
    install them, and a torch upgrade takes effect without a restart); models load on demand."""
    code = f"""
import sys
sys.path[:0] = [{str(REPO_ROOT / "Testing")!r}, {str(MODULE_DIR)!r}]
import slicer_fixtures
sys.modules["slicer.ScriptedLoadableModule"] = slicer_fixtures.make_scripted_loadable_module_stub()
import LumbarBMD, slicer
# what creating and entering the module does without Qt: module metadata, logic, parameter node, buttons, watcher
slicer.mrmlScene = slicer.vtkMRMLScene()
parent = type("Parent", (), {{}})()
parent.path = LumbarBMD.__file__
LumbarBMD.LumbarBMD(parent)
logic = LumbarBMD.LumbarBMDLogic()
params = logic.getParameterNode()
LumbarBMD.LumbarBMDLogic.buttonStates(params)
LumbarBMD.ResultNodesWatcher(print, print).watch(params.table, params.segmentation)
assert LumbarBMD.dependencies.torch_devices_if_loaded() is None  # the device list does not load torch either
print(sorted(m for m in ("torch", "monai", "qt", "ctk", "PythonQt", "scipy", "skimage", "sklearn", "matplotlib",
                        "safetensors", "tqdm") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_module_finds_lumbarbmdlib_from_the_source_tree_without_installation(tmp_path):
    """The path fallback in LumbarBMD.py: the package is found at ../LumbarBMDLib of the module folder."""
    code = f"""
import sys, types
# hide the editable install of the package (pip install -e .), so only the module's fallback can find it
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__name__", "").lower()]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()
try:
    import LumbarBMDLib
    raise SystemExit("LumbarBMDLib importable before the module is loaded: the test proves nothing")
except ImportError:
    pass
sys.path[:0] = [{str(REPO_ROOT / "Testing")!r}, {str(MODULE_DIR)!r}]
import slicer_fixtures
sys.modules["slicer.ScriptedLoadableModule"] = slicer_fixtures.make_scripted_loadable_module_stub()
import LumbarBMD, LumbarBMDLib
print(LumbarBMDLib.__file__)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == str(REPO_ROOT / "LumbarBMDLib" / "__init__.py")


# --------------------------------------------------------------------------------------
# (b) round trip on a real scene
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_roundtrip_ctvolume_node_ctvolume(lumbarbmd_module, mrml, geometry, dtype):
    logic = lumbarbmd_module.LumbarBMDLogic()
    volume = make_ct(GEOMETRIES[geometry], dtype=dtype)

    node = logic.ctVolumeToVolumeNode(volume, name="CT")
    assert node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")
    assert node.GetName() == "CT" and node.GetScene() is mrml.scene
    assert node.GetDisplayNode() is not None
    np.testing.assert_allclose(ijk_to_ras(node), LPS_TO_RAS @ volume.affine, atol=1e-9)
    np.testing.assert_allclose(node.GetSpacing(), SPACING, atol=1e-9)
    assert slicer.util.arrayFromVolume(node).shape == SHAPE

    back = logic.volumeNodeToCTVolume(node)
    assert back.hu.dtype == volume.hu.dtype
    np.testing.assert_array_equal(back.hu, volume.hu)
    assert_same_geometry(back, volume)
    assert back.metadata["mrml_node_id"] == node.GetID()

    # The returned array is a copy: neither later node edits nor node removal touch it.
    slicer.util.arrayFromVolume(node)[:] = 0
    mrml.scene.RemoveNode(node)
    np.testing.assert_array_equal(back.hu, volume.hu)


def test_voxel_ras_position_is_lps_with_x_and_y_negated(lumbarbmd_module, mrml):
    volume = make_ct(oblique_direction(30.0))
    node = lumbarbmd_module.LumbarBMDLogic().ctVolumeToVolumeNode(volume)
    ijk = np.array([[0, 0, 0], [8, 6, 5], [3.5, 2.0, 1.25]])
    lps = volume.index_to_lps(ijk)
    ras = (ijk_to_ras(node) @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-9)
    # and the same point through SimpleITK's own index -> physical mapping
    img = volume.to_sitk()
    np.testing.assert_allclose(img.TransformContinuousIndexToPhysicalPoint(ijk[2].tolist()), lps[2], atol=1e-9)


def test_linear_parent_transform_is_applied_and_nonlinear_refused(lumbarbmd_module, mrml):
    logic = lumbarbmd_module.LumbarBMDLogic()
    volume = make_ct(np.eye(3))
    node = logic.ctVolumeToVolumeNode(volume)

    shift_ras = np.eye(4)
    shift_ras[:3, 3] = (10.0, 20.0, 30.0)  # +10 R, +20 A, +30 S
    transform = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift_ras))
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = logic.volumeNodeToCTVolume(node)
    np.testing.assert_allclose(moved.origin, np.add(ORIGIN_LPS, (-10.0, -20.0, 30.0)), atol=1e-9)
    np.testing.assert_allclose(moved.direction, volume.direction, atol=1e-9)
    np.testing.assert_array_equal(moved.hu, volume.hu)

    warp = mrml.scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    tps = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p, q in [((0, 0, 0), (1, 0, 0)), ((50, 0, 0), (50, 2, 0)), ((0, 50, 0), (0, 50, 3)), ((0, 0, 50), (0, 0, 50))]:
        source.InsertNextPoint(p)
        target.InsertNextPoint(q)
    tps.SetSourceLandmarks(source)
    tps.SetTargetLandmarks(target)
    tps.SetBasisToR()
    warp.SetAndObserveTransformToParent(tps)
    node.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(LumbarBMDError, match="non-linear"):
        logic.volumeNodeToCTVolume(node)


def test_unusable_nodes_raise_the_library_error(lumbarbmd_module, mrml):
    logic = lumbarbmd_module.LumbarBMDLogic()
    with pytest.raises(LumbarBMDError, match="no CT volume selected"):
        logic.volumeNodeToCTVolume(None)
    empty = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(LumbarBMDError, match="holds no image"):
        logic.volumeNodeToCTVolume(empty)
    labels = slicer.util.addVolumeFromArray(
        np.zeros(SHAPE, np.uint8), name="labels", nodeClassName="vtkMRMLLabelMapVolumeNode"
    )
    with pytest.raises(LumbarBMDError, match="not a CT volume"):
        logic.volumeNodeToCTVolume(labels)
    rgb = slicer.util.addVolumeFromArray(
        np.zeros((*SHAPE, 3), np.uint8), name="rgb", nodeClassName="vtkMRMLVectorVolumeNode"
    )
    with pytest.raises(LumbarBMDError, match="3 values per voxel"):
        logic.volumeNodeToCTVolume(rgb)
    with pytest.raises(LumbarBMDError, match="3-D"):
        logic.ctVolumeToVolumeNode(CTVolume(hu=np.zeros((4, 5)), spacing=(1, 1, 1), origin=(0, 0, 0)))


def test_volume_summary_for_the_status_label(lumbarbmd_module, mrml):
    logic = lumbarbmd_module.LumbarBMDLogic()
    assert "Select the CT volume" in logic.volumeSummary(None)
    node = logic.ctVolumeToVolumeNode(make_ct(np.eye(3)), name="Abdomen")
    assert logic.volumeSummary(node) == "'Abdomen': 9 × 7 × 6 voxels, 0.70 × 0.80 × 2.50 mm."


def test_module_self_test_runs_headless(lumbarbmd_module, mrml):
    """Slicer's own self-test (LumbarBMDTest.runTest) passes on the slicer-core scene."""
    mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "left over")
    test = lumbarbmd_module.LumbarBMDTest()
    test.runTest()
    assert mrml.scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == 0  # cleared, cleaned up


# --------------------------------------------------------------------------------------
# (c) the conversion agrees with the file world (NRRD writer, SimpleITK)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_node_written_as_nrrd_reads_back_in_simpleitk_with_the_same_lps_geometry(
    lumbarbmd_module, mrml, tmp_path, geometry
):
    volume = make_ct(GEOMETRIES[geometry])
    node = lumbarbmd_module.LumbarBMDLogic().ctVolumeToVolumeNode(volume)
    storage = mrml.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "ct.nrrd"))
    assert storage.WriteData(node) == 1

    img = sitk.ReadImage(str(tmp_path / "ct.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), volume.hu)
    np.testing.assert_allclose(img.GetSpacing(), volume.spacing, atol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), volume.origin, atol=1e-6)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), volume.direction, atol=1e-6)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_file_written_by_simpleitk_loads_into_the_same_ctvolume(lumbarbmd_module, mrml, tmp_path, geometry):
    volume = make_ct(GEOMETRIES[geometry])
    sitk.WriteImage(volume.to_sitk(), str(tmp_path / "ct.nrrd"))
    node = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "loaded")
    storage = mrml.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "ct.nrrd"))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node) == 1

    loaded = lumbarbmd_module.LumbarBMDLogic().volumeNodeToCTVolume(node)
    np.testing.assert_array_equal(loaded.hu, volume.hu)
    np.testing.assert_allclose(loaded.affine, volume.affine, atol=1e-5)


# --------------------------------------------------------------------------------------
# (d) the .ui file matches what the module accesses
# --------------------------------------------------------------------------------------
def ui_tree() -> ET.ElementTree:
    return ET.parse(UI_FILE)  # raises on malformed XML


def test_ui_file_is_a_well_formed_qmrmlwidget():
    root = ui_tree().getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == root.findtext("class") == "LumbarBMD"

    used = {w.get("class") for w in root.iter("widget")}
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    assert {c for c in used if not c.startswith("Q")} <= declared  # every non-Qt class is declared
    assert {"qMRMLWidget", "ctkCollapsibleButton", "qMRMLNodeComboBox"} <= declared

    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"


def ui_names() -> dict[str, str]:
    """``{widget name: class}`` of every widget in the .ui."""
    return {w.get("name"): w.get("class") for w in ui_tree().getroot().iter("widget")}


def test_every_ui_widget_the_module_uses_exists_in_the_ui_file(lumbarbmd_module):
    source = MODULE_FILE.read_text(encoding="utf-8")
    used = set(re.findall(r"\bself\.ui\.(\w+)", source))
    assert used >= {"computeButton", "statusLabel", "resultsTableWidget", "qctL4SpinBox", "exportResultsButton"}
    buttons = set(lumbarbmd_module.LumbarBMDLogic.buttonStates(None))  # enabled by name: getattr(self.ui, name)
    assert buttons >= {"computeButton", "exportResultsButton", "exportTrainingPairButton"}
    names = ui_names()
    missing = sorted((used | buttons) - set(names))
    assert not missing, f"used in LumbarBMD.py but missing in LumbarBMD.ui: {missing}"
    assert {names[b] for b in buttons} == {"QPushButton"}


def slicer_parameter_names() -> dict[str, ET.Element]:
    """``{parameter name: widget element}`` from the ``SlicerParameterName`` dynamic properties of the .ui."""
    found = {}
    for w in ui_tree().getroot().iter("widget"):
        p = w.find("property[@name='SlicerParameterName']")
        if p is not None:
            assert p.get("stdset") == "0", f"{w.get('name')}: a dynamic property needs stdset=0"
            name = p.findtext("string")
            assert name and name not in found, f"parameter {name!r} named twice or empty"
            found[name] = w
    return found


def test_every_slicer_parameter_name_names_a_parameter_of_a_type_its_connector_can_represent(lumbarbmd_module):
    """What ``connectParametersToGui`` would check in Slicer, statically: every ``SlicerParameterName`` is a parameter
    of the wrapper, every parameter has exactly one widget, and the widget class can represent the parameter's type
    under the rules of Slicer's connectors (parameterNodeWrapper/guiConnectors.py) or of the module's own."""
    import typing

    module = lumbarbmd_module
    hints = typing.get_type_hints(module.LumbarBMDParameterNode, include_extras=True)
    widgets = slicer_parameter_names()
    assert set(widgets) == set(hints), (set(widgets) ^ set(hints))
    for name, element in widgets.items():
        cls, hint = element.get("class"), hints[name]
        annotated = typing.get_origin(hint) is typing.Annotated
        base = typing.get_args(hint)[0] if annotated else hint
        extras = typing.get_args(hint)[1:] if annotated else ()
        if cls in module.OWN_CONNECTORS:  # QLineEdit, ctkPathLineEdit: str, written only when it differs
            assert base is str, f"{name}: {cls} needs a str parameter, not {hint}"
        elif cls == "qMRMLNodeComboBox":
            assert isinstance(base, type) and issubclass(base, slicer.vtkMRMLNode), name
            assert [s.text for s in prop(element, "nodeTypes").iter("string")] == [base.__name__], name
        elif cls == "QCheckBox":
            assert base is bool, name
        elif cls == "QDoubleSpinBox":  # without a range Slicer's connector sets the spin box to -inf..inf
            assert base is float, name
            ranges = [a for a in extras if isinstance(a, module.WithinRange)]
            assert len(ranges) == 1, f"{name}: a WithinRange annotation keeps the .ui's range"
            assert (ranges[0].minimum, ranges[0].maximum) == (
                float(prop(element, "minimum").findtext("double")), float(prop(element, "maximum").findtext("double")))
        elif cls == "QComboBox":  # Slicer's connector fills the items from the Choice annotation
            choices = [a for a in extras if isinstance(a, module.Choice)]
            assert base is str and len(choices) == 1, name
            assert list(choices[0].choices) == list(module.dependencies.DEVICES) == ["auto", "cpu", "cuda"]
        else:
            raise AssertionError(f"{name}: no connector for widget class {cls}")


def test_no_widget_with_a_parameter_is_also_synchronised_by_hand():
    """The hand-written two-way sync is gone: a widget connected through its SlicerParameterName must not also be
    connected by the module's code (it would write the GUI on every change again)."""
    source = MODULE_FILE.read_text(encoding="utf-8")
    by_name = {w.get("name") for w in slicer_parameter_names().values()}
    touched = set(re.findall(r"\bself\.ui\.(\w+)\.(?:connect|text|currentPath|directory|value|checked|setCurrent)",
                             source))
    assert not touched & by_name, sorted(touched & by_name)
    assert "updateParameterNodeFromGUI" not in source and "updateGUIFromParameterNode" not in source
    assert "connectParametersToGui(guiConnectors(self.ui))" in source


class StandInLineEdit:
    """A plain object with the property the connectors read and write (Qt cannot run here). It counts the writes and,
    like ``QLineEdit.setText``, moves the cursor to the end on every write, even of the same text."""

    def __init__(self, prop: str, value: str, cursor: int = 0) -> None:
        self._prop, self._value, self.cursor, self.writes = prop, value, cursor, 0

    def __getattr__(self, name):
        if name == self.__dict__.get("_prop"):
            return self._value
        raise AttributeError(name)

    def __setattr__(self, name, value):
        if name == self.__dict__.get("_prop"):
            self.__dict__["_value"], self.__dict__["cursor"] = value, len(value)
            self.__dict__["writes"] += 1
        else:
            super().__setattr__(name, value)


@pytest.mark.parametrize("kind,prop", [("LineEditConnector", "text"), ("PathLineEditConnector", "currentPath")])
def test_own_connectors_write_to_the_widget_only_when_the_value_differs(lumbarbmd_module, kind, prop):
    """The case id (and path) fields: the parameter node rewrites every connected widget on each change; writing the
    same text again would put the cursor at the end after every keystroke (Slicer issue #8620)."""
    connector = getattr(lumbarbmd_module, kind)(StandInLineEdit(prop, "abcd", cursor=2))
    widget = connector.widget()
    assert connector.read() == "abcd"
    connector.write("abcd")  # the echo of the user's own keystroke
    assert widget.writes == 0 and widget.cursor == 2
    connector.write("abXcd")  # a new value from the scene (another case id, a reloaded scene)
    assert widget.writes == 1 and connector.read() == "abXcd"
    connector.write("")  # an empty path stays empty (Slicer's Path connector would write ".")
    assert connector.read() == "" and widget.writes == 2


def test_line_edits_and_path_line_edits_use_the_module_s_connectors_with_str_parameters(lumbarbmd_module):
    classes = {w.get("class") for w in slicer_parameter_names().values()}
    assert {"QLineEdit", "ctkPathLineEdit"} <= classes
    assert set(lumbarbmd_module.OWN_CONNECTORS) == {"QLineEdit", "ctkPathLineEdit"}
    assert lumbarbmd_module.OWN_CONNECTORS["ctkPathLineEdit"].valueProperty == "currentPath"
    for name in ("datasetFolder", "resultsFolder"):  # folders that may be empty: ctkPathLineEdit in directory mode
        element = slicer_parameter_names()[name]
        assert element.get("class") == "ctkPathLineEdit"
        assert prop(element, "filters").findtext("set") == "ctkPathLineEdit::Dirs"
    assert "ctkDirectoryButton" not in ui_names().values()  # its directory is never empty (".")


def widget(name: str) -> ET.Element:
    found = [w for w in ui_tree().getroot().iter("widget") if w.get("name") == name]
    assert len(found) == 1, name
    return found[0]


def prop(element: ET.Element, name: str) -> ET.Element | None:
    return element.find(f"property[@name='{name}']")


def test_ui_widgets_are_configured_as_specified():
    root = ui_tree().getroot()
    sections = [w for w in root.iter("widget") if w.get("class") == "ctkCollapsibleButton"]
    assert [prop(w, "text").findtext("string") for w in sections] == [
        "Inputs", "Advanced", "Results", "Annotation (training data)"]
    assert "inputVolumeSelector" in [w.get("name") for w in sections[0].iter("widget")]
    node_types = {
        "inputVolumeSelector": "vtkMRMLScalarVolumeNode",
        "segmentationSelector": "vtkMRMLSegmentationNode",
        "tableSelector": "vtkMRMLTableNode",
        "annotationImageSelector": "vtkMRMLScalarVolumeNode",
        "annotationSegmentationSelector": "vtkMRMLSegmentationNode",
    }
    for name, node_type in node_types.items():
        selector = widget(name)
        assert selector.get("class") == "qMRMLNodeComboBox"
        assert [s.text for s in prop(selector, "nodeTypes").iter("string")] == [node_type]
        assert prop(selector, "noneEnabled").findtext("bool") == "true"
        assert prop(selector, "addEnabled").findtext("bool") == "false"
        assert prop(selector, "removeEnabled").findtext("bool") == "false"

    buttons = {"computeButton": "Compute BMD", "editSegmentsButton": "Edit segments",
               "recomputeButton": "Recompute BMD", "createAnnotationButton": "Create annotation image",
               "exportTrainingPairButton": "Export training pair", "cancelButton": "Cancel",
               "exportResultsButton": "Export results"}
    for name, text in buttons.items():
        button = widget(name)
        assert button.get("class") == "QPushButton"
        assert prop(button, "text").findtext("string") == text
        assert prop(button, "toolTip").findtext("string")
    for level in ("L1", "L2", "L3", "L4"):
        spin = widget(f"qct{level}SpinBox")
        assert spin.get("class") == "QDoubleSpinBox"
        assert float(prop(spin, "minimum").findtext("double")) == 0.0  # 0 shows "—": no reference value
        assert float(prop(spin, "maximum").findtext("double")) == 400.0
    assert widget("resultsTableWidget").get("class") == "QTableWidget"
    assert widget("statusLabel").get("class") == "QLabel"
    assert widget("meanBMDLabel").get("class") == "QLabel"

    connections = {
        (c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
        for c in root.iter("connection")
    }
    for name in node_types:  # every node selector gets the scene
        assert ("LumbarBMD", "mrmlSceneChanged(vtkMRMLScene*)", name, "setMRMLScene(vtkMRMLScene*)") in connections


# --------------------------------------------------------------------------------------
# (e) module metadata
# --------------------------------------------------------------------------------------
def test_module_metadata_is_set_on_the_parent(lumbarbmd_module):
    parent = types.SimpleNamespace(path=str(MODULE_FILE))
    module = lumbarbmd_module.LumbarBMD(parent)
    assert module.parent is parent and module.moduleName == "LumbarBMD"
    assert parent.title == "Lumbar BMD"
    assert parent.categories == ["Quantification"]
    assert parent.dependencies == []
    assert parent.contributors and all(isinstance(c, str) and c for c in parent.contributors)
    assert "mg/cm³" in parent.helpText and "https://github.com/lumbarbmd/SlicerLumbarBMD" in parent.helpText
    for word in ("R2U-Net", "DenseNet-121", "TotalSegmentator", "Apache-2.0"):
        assert word in parent.acknowledgementText
    # the resources the module and widget load exist where Slicer looks for them
    assert (MODULE_DIR / "Resources" / "Icons" / "LumbarBMD.png").is_file()
    assert module.resourcePath("UI/LumbarBMD.ui") == str(UI_FILE)
    assert UI_FILE.is_file()


def test_icons_are_128_pixel_pngs():
    from PIL import Image

    for path in (
        MODULE_DIR / "Resources" / "Icons" / "LumbarBMD.png",
        REPO_ROOT / "Resources" / "Icons" / "LumbarBMD.png",
    ):
        with Image.open(path) as icon:
            assert icon.format == "PNG" and icon.size == (128, 128)


def test_extension_metadata_is_complete_and_points_at_files_in_the_repository():
    text = (REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    fields = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', text))
    for name in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS",
                 "STATUS"):
        assert fields.get(f"EXTENSION_{name}"), name
    prefix = "https://raw.githubusercontent.com/lumbarbmd/SlicerLumbarBMD/main/"
    for url in (fields["EXTENSION_ICONURL"], *fields["EXTENSION_SCREENSHOTURLS"].split()):
        assert url.startswith(prefix) and (REPO_ROOT / url.removeprefix(prefix)).is_file(), url
    assert "add_subdirectory(LumbarBMD)" in text
    # contributors in Slicer's "Name (Organization)" form, no template placeholder
    contributors = fields["EXTENSION_CONTRIBUTORS"]
    assert "John Doe" not in contributors and "AnyWare" not in contributors
    assert all(re.fullmatch(r"[^(),]+ \([^()]+\)", c.strip()) for c in re.split(r",\s*(?![^()]*\))", contributors))
    # the screenshot is labelled for what it is (no Slicer on the development machines)
    screenshot_block = text[:text.index("set(EXTENSION_SCREENSHOTURLS")].rsplit("\n\n", 1)[-1]
    assert "NOT a screenshot of Slicer" in screenshot_block
    assert fields["EXTENSION_SCREENSHOTURLS"].endswith("docs/images/report_chromium.png")
    # the extensions index entry builds what the extension depends on first
    entry = json.loads((REPO_ROOT / "docs" / "ExtensionsIndex" / "LumbarBMD.json").read_text(encoding="utf-8"))
    assert entry["build_dependencies"] == fields["EXTENSION_DEPENDS"].split() == ["PyTorch"]
    assert entry["category"] == fields["EXTENSION_CATEGORY"]
    assert entry["scm_url"].startswith(fields["EXTENSION_HOMEPAGE"])
    module_cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "LumbarBMDLib" in module_cmake and "Resources/Models" in module_cmake
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module_cmake


def test_the_license_file_is_the_apache_2_0_text_that_pyproject_declares():
    import tomllib

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["license"] == {"text": "Apache-2.0"}
    text = (REPO_ROOT / "LICENSE.txt").read_text(encoding="utf-8")
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    sections = re.findall(r"^\s+(\d+)\. (\w[\w ]+)\.", text, flags=re.M)
    assert [int(n) for n, _ in sections] == list(range(1, 10))  # the nine sections of the licence
    assert "END OF TERMS AND CONDITIONS" in text and "http://www.apache.org/licenses/LICENSE-2.0" in text


def test_the_module_says_which_slicer_it_needs(lumbarbmd_module):
    parent = types.SimpleNamespace(path=str(MODULE_FILE))
    lumbarbmd_module.LumbarBMD(parent)
    assert "Needs 3D Slicer 5.8 or later" in parent.helpText
    assert parent.contributors == ["LumbarBMD developers (LumbarBMD project)"]
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "5.4 or later" not in source  # the old, wrong minimum
    # the widget shows the library's sentence instead of its GUI in an older Slicer (checked in setup, before loadUI)
    setup = source[source.index("    def setup(self) -> None:"):source.index("    def _qctSpinBoxes")]
    assert setup.index("unsupported_slicer_message(slicerVersion())") < setup.index("slicer.util.loadUI")
