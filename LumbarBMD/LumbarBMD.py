"""Lumbar BMD: the 3D Slicer scripted module (Module, Widget, Logic, Test).

The algorithm lives in the plain Python package ``LumbarBMDLib`` (no ``slicer``/``qt``/``vtk`` there).
This file only adapts it to Slicer:

- the Widget wires the GUI (``Resources/UI/LumbarBMD.ui``) to the Logic;
- the Logic is the MRML adapter: volume node <-> :class:`LumbarBMDLib.volume.CTVolume`. It is the only
  place where RAS (MRML) and LPS (the library, ITK, DICOM) meet, and it imports and runs without Qt,
  so that pytest drives it on a real ``slicer-core`` MRML scene;
- the Test is Slicer's self-test (Developer mode > Reload and Test, or ``slicer_add_python_unittest``).

torch is never imported at module import time: the models are loaded when a computation needs them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import threading
import typing
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:  # Qt and CTK exist inside Slicer only; the Logic below works without them (pytest + slicer-core).
    import ctk
    import qt
except ImportError:
    ctk = qt = None

try:
    import LumbarBMDLib
except ImportError:
    # Source tree: LumbarBMD/LumbarBMD.py next to LumbarBMDLib/ (the repository root). In an installed
    # extension the package is copied next to this file, in the scripted-modules folder Slicer puts on
    # sys.path, and this fallback is not needed.
    _moduleDir = os.path.dirname(os.path.abspath(__file__))
    for _path in (_moduleDir, os.path.dirname(_moduleDir)):
        if _path not in sys.path:
            sys.path.insert(0, _path)
    import LumbarBMDLib
from LumbarBMDLib import dependencies
from LumbarBMDLib.errors import ComputationCancelled, LumbarBMDError
from LumbarBMDLib.figures import CATEGORY_COLOURS, LEVEL_COLOURS
from LumbarBMDLib.sagittal import WINDOW_HU, SagittalGeometry
from LumbarBMDLib.training_pair import LEVEL_NAMES, write_training_pair
from LumbarBMDLib.volume import CTVolume, validated_ct

#: LPS <-> RAS: negate x and y (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

NOT_MEASURED_COLOUR = "#BDBDBD"  # grey: a level or patient without a BMD


def _hex(rgb: tuple[int, int, int]) -> str:
    """``#RRGGBB`` of an RGB 0–255 colour."""
    return "#{:02X}{:02X}{:02X}".format(*rgb)

README_URL = "https://github.com/lumbarbmd/SlicerLumbarBMD#readme"


#
# LumbarBMD
#


class LumbarBMD(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Lumbar BMD"
        self.parent.categories = ["Quantification"]
        self.parent.dependencies = []
        self.parent.contributors = ["LumbarBMD developers (LumbarBMD project)"]
        self.parent.helpText = f"""
Opportunistic lumbar bone mineral density (volumetric BMD in mg/cm³, QCT-equivalent) from a routine
abdominal or spine CT. The module finds the spinal canal, reslices the CT sagittally through it,
segments L1–L4 with an R2U-Net, regresses the BMD of each vertebral body with a DenseNet-121 and
classifies the patient as osteoporosis (&lt; 80), osteopenia (80–120) or normal (&gt; 120 mg/cm³).
<p>Needs 3D Slicer {".".join(map(str, dependencies.SLICER_MINIMUM))} or later. PyTorch, MONAI and a few other Python
packages are installed on first use, after asking; the packages that come with Slicer are kept as they are.</p>
<p>See the <a href="{README_URL}">README</a> for installation, usage and the command line tool.</p>
<p>LumbarBMD version {LumbarBMDLib.__version__}. Not a medical device: for research use.</p>
"""
        self.parent.acknowledgementText = """
The method follows the published approach to lumbar BMD from CT: R2U-Net segmentation of L1–L4 on a
canal-centred sagittal image, and DenseNet-121 regression of volumetric BMD from trabecular patches.
Example data: TotalSegmentator example CT (Apache-2.0).
"""


#
# Parameter node
#


def _headlessParameterNodeWrapper(classtype):
    """Typed properties over a ``vtkMRMLScriptedModuleNode``, for Slicer builds without ``parameterNodeWrapper``.

    It stores values exactly as Slicer's ``slicer.parameterNodeWrapper`` serializers do (str as is, numbers as
    ``str(value)``, bools as ``"True"``/``"False"``, nodes as a node reference plus an empty parameter of the same
    name), so a scene saved by either reads back in the other. Defaults are written when a parameter is absent.
    Used by the pytest suite (the ``slicer-core`` wheel has no ``parameterNodeWrapper``, which needs Qt).
    """
    hints = typing.get_type_hints(classtype)
    defaults = {name: getattr(classtype, name, None) for name in hints}

    def makeProperty(name, kind):
        def getter(self):
            node = self.parameterNode
            if kind == "node":
                return node.GetNodeReference(name)
            text = node.GetParameter(name)
            if kind is bool:
                return text == "True"
            return kind(text) if kind is not str else text

        def setter(self, value):
            node = self.parameterNode
            if kind == "node":
                if value is not None and not isinstance(value, hints[name]):
                    raise TypeError(f"{name} must be a {hints[name].__name__}, not {type(value).__name__}")
                wasModified = node.StartModify()
                try:
                    node.SetParameter(name, "")
                    node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
                finally:
                    node.EndModify(wasModified)
            elif kind is bool:
                node.SetParameter(name, "True" if value else "False")
            else:
                node.SetParameter(name, str(kind(value)))

        return property(getter, setter)

    kinds = {}
    for name, hint in hints.items():
        kinds[name] = "node" if isinstance(hint, type) and issubclass(hint, slicer.vtkMRMLNode) else hint
        setattr(classtype, name, makeProperty(name, kinds[name]))

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        for name in kinds:
            if not parameterNode.HasParameter(name):
                setattr(self, name, defaults[name])

    classtype.__init__ = __init__
    classtype.allParameters = dict(hints)
    return classtype


try:  # Slicer ≥ 5.4 (needs Qt); absent from the slicer-core wheel the tests use
    from slicer.parameterNodeWrapper import parameterNodeWrapper
except ImportError:
    parameterNodeWrapper = _headlessParameterNodeWrapper
try:  # annotations that Slicer's GUI connectors read (choices of a combo box, range of a spin box)
    from slicer.parameterNodeWrapper import Choice, WithinRange
except ImportError:
    class Choice:
        """Stand-in for ``slicer.parameterNodeWrapper.Choice`` (the allowed values of a parameter)."""

        def __init__(self, choices):
            self.choices = choices

    class WithinRange:
        """Stand-in for ``slicer.parameterNodeWrapper.WithinRange`` (inclusive range of a number)."""

        def __init__(self, minimum, maximum):
            self.minimum, self.maximum = minimum, maximum


QCT_RANGE = (0.0, 400.0)  # mg/cm³; 0 shows "—" (no reference value)


@parameterNodeWrapper
class LumbarBMDParameterNode:
    """The module's state, kept in the scene (so it is saved and reloaded with it).

    Every parameter has a widget in ``LumbarBMD.ui`` whose ``SlicerParameterName`` dynamic property names it (a static
    test checks both ways and the types). inputVolume: the CT. segmentation / table: the L1–L4 segments and the BMD
    table of the last computation (the segments are what "Recompute BMD" measures). annotationImage /
    annotationSegmentation: the annotator's 20-slice mean sagittal image and the segments drawn on it. device: "auto",
    "cpu" or "cuda". segmentationModelPath / regressionModelPath: model files ("" = the shipped defaults).
    calibrationPath: scanner calibration JSON (``lumbarbmd calibrate``), "" for none. resultsFolder: where "Export
    results" writes ("" = none chosen: the export refuses). datasetFolder / caseId / overwriteCase: where "Export
    training pair" writes ("" = none chosen). qctL1..qctL4: QCT reference BMD (mg/cm³) of each level for
    ``train-bmd``; 0 = none. Paths are ``str``, not ``pathlib.Path``: ``Path("")`` is ".", the working directory.
    """

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    segmentation: slicer.vtkMRMLSegmentationNode
    table: slicer.vtkMRMLTableNode
    annotationImage: slicer.vtkMRMLScalarVolumeNode
    annotationSegmentation: slicer.vtkMRMLSegmentationNode
    device: typing.Annotated[str, Choice(list(dependencies.DEVICES))] = "auto"
    segmentationModelPath: str = ""
    regressionModelPath: str = ""
    calibrationPath: str = ""
    resultsFolder: str = ""
    datasetFolder: str = ""
    caseId: str = ""
    overwriteCase: bool = False
    qctL1: typing.Annotated[float, WithinRange(*QCT_RANGE)] = 0.0
    qctL2: typing.Annotated[float, WithinRange(*QCT_RANGE)] = 0.0
    qctL3: typing.Annotated[float, WithinRange(*QCT_RANGE)] = 0.0
    qctL4: typing.Annotated[float, WithinRange(*QCT_RANGE)] = 0.0


@dataclass(frozen=True)
class ComputeSettings:
    """What a computation needs from the parameter node, read in the main thread before the work starts."""

    device: str = "auto"
    segmentationModelPath: str = ""
    regressionModelPath: str = ""
    calibrationPath: str = ""


@dataclass
class Measurement:
    """A finished computation (no MRML in it): the library's result and its ``results.json`` object."""

    result: object  # LumbarBMDLib.pipeline.CaseResult (torch-dependent module, imported lazily)
    results: dict


@dataclass
class ResultNodes:
    """The nodes a computation created or updated."""

    segmentation: object
    table: object
    results: dict


#
# GUI <-> parameter node: Slicer's connectors, plus two that write to the widget only when the value differs
#

try:  # Slicer ≥ 5.4 (needs Qt); the headless tests check the connectors' rule on plain objects
    from slicer.parameterNodeWrapper import GuiConnector as _GuiConnectorBase
except ImportError:
    _GuiConnectorBase = object

#: The dynamic property of a widget in LumbarBMD.ui that names its parameter (Slicer's parameterNodeWrapper reads it).
SLICER_PARAMETER_NAME = "SlicerParameterName"


class LineEditConnector(_GuiConnectorBase):
    """``QLineEdit`` <-> ``str``, written to the widget only when the value differs from what it shows.

    Slicer's own ``QLineEditToStrConnector`` rewrites the text on every change of the parameter node, and
    ``QLineEdit.setText`` puts the cursor at the end: typing inside the case id would jump to the end after each
    keystroke (Slicer issue #8620). Not registered with Slicer (``canRepresent`` is False): the widget hands it to
    ``connectParametersToGui`` for its own line edits only.
    """

    valueProperty = "text"
    signal = "textChanged"

    def __init__(self, widget) -> None:
        super().__init__()
        self._widget = widget

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return False

    @staticmethod
    def create(widget, datatype):
        return None

    def _connect(self) -> None:
        getattr(self._widget, self.signal).connect(self.changed)

    def _disconnect(self) -> None:
        getattr(self._widget, self.signal).disconnect(self.changed)

    def widget(self):
        return self._widget

    def read(self) -> str:
        return getattr(self._widget, self.valueProperty)

    def write(self, value: str) -> None:
        if self.read() != value:
            setattr(self._widget, self.valueProperty, value)


class PathLineEditConnector(LineEditConnector):
    """``ctkPathLineEdit`` <-> ``str`` (a path; "" while none is chosen), written only when it differs.

    Slicer's own path connectors convert to ``pathlib.Path``, which turns "" into "." (the working directory), and
    rewrite the text on every parameter change like the line edit's.
    """

    valueProperty = "currentPath"
    signal = "currentPathChanged"


#: Widget classes (C++ class names) connected by this module's connectors instead of Slicer's.
OWN_CONNECTORS = {"QLineEdit": LineEditConnector, "ctkPathLineEdit": PathLineEditConnector}


def guiConnectors(ui) -> dict:
    """``{parameter name: widget or connector}`` for every widget of ``ui`` with a ``SlicerParameterName``: what
    ``connectGui`` connects, with this module's connectors for line edits and path line edits."""
    mapping = {}
    for widget in vars(ui).values():
        name = widget.property(SLICER_PARAMETER_NAME) if hasattr(widget, "property") else None
        if not name:
            continue
        connector = OWN_CONNECTORS.get(widget.className())
        mapping[str(name)] = connector(widget) if connector is not None else widget
    return mapping


class ResultNodesWatcher(VTKObservationMixin):
    """Says when the widget's results table must be shown again, and only then.

    ``onTableChanged(tableNode)`` is called when the watched table is another node, or that table node was modified
    (a computation, a recompute, a scene reload); ``onSegmentsEdited(edited)`` with True when a segment of the watched
    segmentation was modified, and with False when another segmentation is watched. Any other change of the parameter
    node (typing a case id, choosing a folder) refreshes nothing. Needs no Qt.
    """

    def __init__(self, onTableChanged, onSegmentsEdited) -> None:
        VTKObservationMixin.__init__(self)
        self.onTableChanged = onTableChanged
        self.onSegmentsEdited = onSegmentsEdited
        self.table = None
        self.segmentation = None

    def watch(self, tableNode, segmentationNode) -> None:
        if segmentationNode is not self.segmentation:
            if self.segmentation is not None:
                self.removeObserver(self.segmentation, slicer.vtkSegmentation.SegmentModified, self._onSegmentModified)
            self.segmentation = segmentationNode
            if segmentationNode is not None:
                self.addObserver(segmentationNode, slicer.vtkSegmentation.SegmentModified, self._onSegmentModified)
            self.onSegmentsEdited(False)
        if tableNode is not self.table:
            if self.table is not None:
                self.removeObserver(self.table, vtk.vtkCommand.ModifiedEvent, self._onTableModified)
            self.table = tableNode
            if tableNode is not None:
                self.addObserver(tableNode, vtk.vtkCommand.ModifiedEvent, self._onTableModified)
            self.onTableChanged(tableNode)

    def _onTableModified(self, caller, event) -> None:
        self.onTableChanged(self.table)

    def _onSegmentModified(self, caller, event) -> None:
        self.onSegmentsEdited(True)


#
# Installing the dependencies (Slicer application only; the rules are in LumbarBMDLib.dependencies)
#


def slicerVersion() -> tuple | None:
    """(major, minor, patch) of the running Slicer, or None outside the application."""
    app = getattr(slicer, "app", None)
    if app is None:
        return None
    try:
        version = [int(app.majorVersion), int(app.minorVersion)]
    except (AttributeError, TypeError, ValueError):
        return None
    patch = re.match(r"\d+\.\d+\.(\d+)", str(getattr(app, "applicationVersion", "")))
    return tuple(version + ([int(patch.group(1))] if patch else []))


def _slicerPipEnsure():
    """Slicer's own installer when this Slicer has one: ``slicer.packaging.pip_ensure`` (Slicer ≥ 5.12), or
    ``slicer.pydeps.pip_ensure`` (its name in 5.11 previews); None in Slicer 5.8 and 5.10."""
    for name in ("slicer.packaging", "slicer.pydeps"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if callable(getattr(module, "pip_ensure", None)):
            return module.pip_ensure
    return None


def _installTorch(requirement, progress) -> None:
    try:
        import PyTorchUtils  # the SlicerPyTorch extension picks the CUDA build matching the driver
    except ImportError:
        PyTorchUtils = None
    progress.labelText = "Installing PyTorch" + (" (PyTorch extension)..." if PyTorchUtils else "...")
    slicer.app.processEvents()
    if PyTorchUtils is None:
        slicer.util.pip_install([str(requirement)])
    elif PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=False, torchVersionRequirement=str(requirement.specifier)
    ) is None:
        raise LumbarBMDError("PyTorch could not be installed: install it in the 'PyTorch Utils' module")


def installDependencies(ask: bool = True, requirements=dependencies.RUNTIME_REQUIREMENTS) -> bool:
    """Install what the pipeline needs into Slicer's Python, as ``dependencies.install_plan`` says; True when all is
    there (False when the user declined, or Slicer has to restart first).

    Packages that Slicer bundles are never installed (an old one is a LumbarBMDError naming the Slicer to install);
    torch goes through the PyTorch extension when it is installed; the rest through Slicer's ``pip_ensure``
    (Slicer ≥ 5.12) or ``pip_install``, both with a constraints file that pins what Slicer bundles and the installed
    torch. When a package that was already imported changed (torch above all), Slicer must restart: the user is asked.
    """
    plan = dependencies.install_plan(requirements)
    if plan.problem:
        raise LumbarBMDError(plan.problem)
    if plan.nothing_to_do:
        return True
    names = "\n".join(f"  {r}" for r in plan.to_install)
    if ask and not slicer.util.confirmOkCancelDisplay(
        f"Lumbar BMD needs these Python packages, which are not installed in Slicer yet:\n\n{names}\n\n"
        f"Packages that come with Slicer ({', '.join(dependencies.BUNDLED_WITH_SLICER)}) are kept as they are. "
        "Install now? This needs a network connection and can take several minutes (PyTorch is large).",
        "Lumbar BMD: install dependencies",
    ):
        return False
    everything = [r.name for r in plan.to_install] + list(plan.installed)
    before = dependencies.installed_versions(everything)
    progress = slicer.util.createProgressDialog(labelText="Installing Python packages...", maximum=0)
    try:
        slicer.app.processEvents()
        if plan.pytorch is not None:
            _installTorch(plan.pytorch, progress)
        if plan.pip:
            progress.labelText = f"Installing {', '.join(r.name for r in plan.pip)}..."
            slicer.app.processEvents()
            with tempfile.TemporaryDirectory(prefix="LumbarBMD-") as folder:
                constraints = os.path.join(folder, "constraints.txt")
                with open(constraints, "w", encoding="utf-8") as f:  # after torch: pins the build just installed
                    f.write(dependencies.constraints_text(dependencies.installed_versions(everything)))
                pipEnsure = _slicerPipEnsure()
                if pipEnsure is not None:
                    pipEnsure([str(r) for r in plan.pip], constraints=constraints, prompt_install=False,
                              prompt_restart=False, requester="Lumbar BMD", skip_in_testing=False)
                else:
                    slicer.util.pip_install(["-c", constraints, *[str(r) for r in plan.pip]])
    finally:
        progress.close()
    restart = dependencies.restart_message(dependencies.changed_loaded_packages(
        before, dependencies.installed_versions(everything)))
    still = dependencies.missing_requirements(requirements)
    if still and not restart:
        raise LumbarBMDError(f"still missing after installation: {', '.join(map(str, still))}; restart Slicer "
                             "and try again, or install them from the Python console with slicer.util.pip_install")
    if restart:
        if slicer.util.confirmYesNoDisplay(restart + "\n\nRestart Slicer now?", "Lumbar BMD: restart needed"):
            slicer.util.restart()
        return False
    return True


#
# LumbarBMDWidget
#


class ResultDiscarded(LumbarBMDError):
    """The CT was removed, or the scene closed, while it was measured: the result was not applied."""


class LumbarBMDWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI only: loads the .ui file and wires it to :class:`LumbarBMDLogic`. No algorithm here.

    Wired the way Slicer's scripted-module template (Slicer ≥ 5.4) does it: state lives in the parameter node
    (:class:`LumbarBMDParameterNode`) and the widgets named by their ``SlicerParameterName`` property are connected to
    it by ``connectParametersToGui`` (what ``connectGui`` does, with :data:`OWN_CONNECTORS` for the line edits). The
    results table is refreshed only when its table node changes (:class:`ResultNodesWatcher`). Heavy work (the
    pipeline) runs in a worker thread while the GUI keeps processing events and shows progress; "Cancel" stops it at
    the next stage.
    Nothing heavy (torch, MONAI, scipy, matplotlib) is imported when the module is created or entered.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._watcher = None
        self._busy = False
        self._cancelRequested = False
        self._segmentsEdited = False
        self._summarisedVolume = False  # the volume whose summary the status label shows (False: none yet)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        unsupported = dependencies.unsupported_slicer_message(slicerVersion())
        if unsupported:  # an older Slicer: say which one is needed instead of failing half-way
            label = qt.QLabel(unsupported)
            label.wordWrap = True
            label.openExternalLinks = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LumbarBMD.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # The .ui connects mrmlSceneChanged(vtkMRMLScene*) to every node selector.
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LumbarBMDLogic()
        self._watcher = ResultNodesWatcher(self.showResults, self.onSegmentsEdited)

        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        self.ui.resultsTableWidget.setColumnCount(6)
        self.ui.resultsTableWidget.setHorizontalHeaderLabels(["Level", "BMD (mg/cm³)", "Category", "Confidence",
                                                              "Identified by", "Note"])
        self.ui.resultsTableWidget.horizontalHeader().setStretchLastSection(True)
        self.ui.resultsTableWidget.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        for spinBox in self._qctSpinBoxes():
            spinBox.setSpecialValueText("—")  # 0 = no reference value

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # actions (the parameters are connected in setParameterNode)
        self.ui.computeButton.connect("clicked(bool)", self.onComputeButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.editSegmentsButton.connect("clicked(bool)", self.onEditSegmentsButton)
        self.ui.recomputeButton.connect("clicked(bool)", self.onRecomputeButton)
        self.ui.exportResultsButton.connect("clicked(bool)", self.onExportResultsButton)
        self.ui.createAnnotationButton.connect("clicked(bool)", self.onCreateAnnotationButton)
        self.ui.editAnnotationButton.connect("clicked(bool)", self.onEditAnnotationButton)
        self.ui.exportTrainingPairButton.connect("clicked(bool)", self.onExportTrainingPairButton)

        self.initializeParameterNode()

    def _qctSpinBoxes(self) -> list:
        return [self.ui.qctL1SpinBox, self.ui.qctL2SpinBox, self.ui.qctL3SpinBox, self.ui.qctL4SpinBox]

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self.logic is not None:
            self.setParameterNode(None)
        if self._watcher is not None:
            self._watcher.removeObservers()
        self.removeObservers()

    def enter(self) -> None:
        if self.logic is None:  # unsupported Slicer: setup showed why
            return
        self.initializeParameterNode()
        self.updateDeviceInfo()

    def exit(self) -> None:
        if self.logic is not None:
            self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if self._parameterNode.inputVolume is None:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume and not firstVolume.GetAttribute(LumbarBMDLogic.ROLE_ATTRIBUTE):
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, parameterNode) -> None:
        """Connect the GUI to ``parameterNode`` (None: disconnect), as the template's setParameterNode does."""
        if self._parameterNode is not None:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self.onParameterNodeModified)
        self._parameterNode = parameterNode
        self._parameterNodeGuiTag = None
        if self._parameterNode is not None:
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(guiConnectors(self.ui))
            self.addObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent,
                             self.onParameterNodeModified)
            self.updateDeviceInfo()  # the device combo box was refilled by its connector
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        """Buttons, the status line and the watched result nodes follow the parameter node (the connectors keep the
        widgets themselves in sync)."""
        p = self._parameterNode
        self._watcher.watch(p.table if p else None, p.segmentation if p else None)
        volume = p.inputVolume if p else None
        if not self._busy and volume is not self._summarisedVolume:
            self.ui.statusLabel.text = self.logic.volumeSummary(volume)
            self._summarisedVolume = volume
        self.updateButtons()

    def updateButtons(self) -> None:
        for name, enabled in LumbarBMDLogic.buttonStates(self._parameterNode, self._busy).items():
            getattr(self.ui, name).enabled = enabled

    def updateDeviceInfo(self) -> None:
        """Show what torch sees, once torch is loaded (entering the module never imports torch or starts CUDA)."""
        choices = dependencies.torch_devices_if_loaded()
        if choices is None:
            installed = importlib.util.find_spec("torch") is not None
            text = dependencies.TORCH_NOT_LOADED if installed else dependencies.TORCH_NOT_INSTALLED
            self.ui.deviceInfoLabel.text = text
            return
        for choice in choices:
            self.ui.deviceComboBox.setItemText(dependencies.DEVICES.index(choice.device), choice.label)
        self.ui.deviceInfoLabel.text = next(c.label for c in choices if c.device == "cuda")

    # --- results display ----------------------------------------------------------------------------------

    def showResults(self, tableNode) -> None:
        """Fill the coloured results table and the patient's mean BMD from the table node."""
        rows = self.logic.tableRows(tableNode)
        table = self.ui.resultsTableWidget
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            colour = qt.QColor(row["colour"])
            colour.setAlpha(110)
            for c, key in enumerate(("level", "bmd", "category", "confidence", "identified", "note")):
                item = qt.QTableWidgetItem(row[key])
                item.setBackground(qt.QBrush(colour))
                if key in ("note", "identified"):
                    item.setToolTip(row[key])
                table.setItem(r, c, item)
        table.resizeColumnsToContents()
        summary = self.logic.patientSummary(tableNode)
        if self._segmentsEdited and summary["status"]:
            summary["message"] = ("The segments were edited after this result: press 'Recompute BMD'. "
                                  + summary["message"])
        self.ui.meanBMDLabel.text = summary["text"]
        self.ui.meanBMDLabel.setStyleSheet(
            f"QLabel {{ background-color: {summary['colour']}; color: black; font-weight: bold; font-size: 15pt;"
            " padding: 6px; border-radius: 4px; }"
        )
        self.ui.resultMessageLabel.text = summary["message"]

    def onSegmentsEdited(self, edited: bool) -> None:
        """Flag the result as out of date when its segments are edited (until 'Recompute BMD')."""
        if not edited:
            self._segmentsEdited = False
        elif not self._busy and not self._segmentsEdited:
            self._segmentsEdited = True
            self.showResults(self._watcher.table)

    # --- running work ----------------------------------------------------------------------------------------

    def ensureDependencies(self) -> bool:
        """Install what LumbarBMD needs into Slicer's Python on first use, after the user confirms."""
        ready = installDependencies(ask=True)
        self.updateDeviceInfo()
        return ready

    def _setBusy(self, busy: bool, message: str = "") -> None:
        self._busy = busy
        self.ui.progressBar.setVisible(busy)
        self.ui.cancelButton.setVisible(busy)
        self.ui.cancelButton.enabled = True
        self.ui.inputsCollapsibleButton.enabled = not busy
        self.ui.annotationCollapsibleButton.enabled = not busy
        if busy:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = message
            slicer.app.setOverrideCursor(qt.Qt.BusyCursor)
        else:
            slicer.app.restoreOverrideCursor()
        self.updateButtons()

    def runInBackground(self, work, message: str):
        """Run ``work(progress)`` in a worker thread; keep the GUI responsive and show progress; return its value.

        ``work`` must not touch MRML or Qt. Its exception (including the cancellation) is re-raised here.
        """
        self._cancelRequested = False
        state = {"fraction": 0.0, "message": message}

        def progress(fraction: float, text: str) -> None:
            if self._cancelRequested:
                raise ComputationCancelled("cancelled: nothing was changed")
            state.update(fraction=fraction, message=text)

        outcome = {}

        def target():
            try:
                outcome["value"] = work(progress)
            except BaseException as error:  # re-raised in the main thread
                outcome["error"] = error

        thread = threading.Thread(target=target, name="LumbarBMD", daemon=True)
        self._setBusy(True, message)
        try:
            thread.start()
            while thread.is_alive():
                self.ui.progressBar.value = int(100 * state["fraction"])
                self.ui.statusLabel.text = state["message"][:1].upper() + state["message"][1:] + "..."
                slicer.app.processEvents(qt.QEventLoop.AllEvents, 50)
                thread.join(0.05)
        finally:
            self._setBusy(False)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def onCancelButton(self) -> None:
        self._cancelRequested = True
        self.ui.cancelButton.enabled = False
        self.ui.statusLabel.text = "Cancelling at the end of the current step..."

    def onComputeButton(self) -> None:
        with slicer.util.tryWithErrorDisplay("Lumbar BMD could not measure this CT.", waitCursor=False):
            if not self.ensureDependencies():
                return
            ctNode = self._parameterNode.inputVolume
            volume = LumbarBMDLogic.ctVolumeForMeasurement(ctNode)  # main thread: reads the node
            settings = self.logic.computeSettings()
            try:
                measurement = self.runInBackground(
                    lambda progress: self.logic.measureVolume(volume, settings, progress), "loading the models")
            except ComputationCancelled:
                self.ui.statusLabel.text = "Cancelled: the scene was not changed."
                return
            finally:
                self.updateDeviceInfo()  # torch is loaded now
            try:
                nodes = self.logic.showResult(ctNode, measurement)  # refuses a CT no longer in the scene
            except ResultDiscarded as why:
                self.ui.statusLabel.text = f"{str(why)[:1].upper()}{str(why)[1:]}."
                return
            self._segmentsEdited = False
            self.showResults(nodes.table)
            self.ui.statusLabel.text = f"Done in {measurement.results['timings_s'].get('total', 0):.1f} s."
            if nodes.results["status"] == "partial":
                slicer.util.warningDisplay(self.logic.resultMessage(nodes.results), windowTitle="Lumbar BMD")

    def onEditSegmentsButton(self) -> None:
        self.openSegmentEditor(self._parameterNode.segmentation, self._parameterNode.inputVolume)

    def onEditAnnotationButton(self) -> None:
        self.openSegmentEditor(self._parameterNode.annotationSegmentation, self._parameterNode.annotationImage)

    @staticmethod
    def openSegmentEditor(segmentationNode, sourceVolumeNode) -> None:
        """Switch to the Segment Editor with this segmentation and source volume selected."""
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentationNode)
        if hasattr(editor, "setSourceVolumeNode"):  # Slicer >= 5.4
            editor.setSourceVolumeNode(sourceVolumeNode)
        else:
            editor.setMasterVolumeNode(sourceVolumeNode)

    def onRecomputeButton(self) -> None:
        with slicer.util.tryWithErrorDisplay("Lumbar BMD could not recompute the BMD.", waitCursor=True):
            if not self.ensureDependencies():
                return
            nodes = self.logic.recompute()
            self._segmentsEdited = False
            self.showResults(nodes.table)
            self.ui.statusLabel.text = "Recomputed from the edited segments."

    def onExportResultsButton(self) -> None:
        with slicer.util.tryWithErrorDisplay("Lumbar BMD could not export the results.", waitCursor=True):
            folder = self.logic.exportResults()
            self.ui.statusLabel.text = f"Results written to {folder}"

    def onCreateAnnotationButton(self) -> None:
        with slicer.util.tryWithErrorDisplay("Lumbar BMD could not create the annotation image.", waitCursor=True):
            if not self.ensureDependencies():
                return
            imageNode, segmentationNode = self.logic.createAnnotationImage()
            slicer.util.setSliceViewerLayers(background=imageNode, fit=True)
            self.openSegmentEditor(segmentationNode, imageNode)

    def onExportTrainingPairButton(self) -> None:
        with slicer.util.tryWithErrorDisplay("Lumbar BMD could not export the training pair.", waitCursor=True):
            folder = self.logic.exportTrainingPair()
            self.ui.statusLabel.text = f"Exported to {folder}"
            slicer.util.infoDisplay(f"Training pair written to\n{folder}", windowTitle="Lumbar BMD")


#
# LumbarBMDLogic
#


class LumbarBMDLogic(ScriptedLoadableModuleLogic):
    """MRML adapter between Slicer nodes and ``LumbarBMDLib``. Holds no algorithm and needs no Qt.

    RAS (MRML) <-> LPS (the library) conversion happens here and nowhere else. Every method that computes
    delegates to the library (``pipeline.measure``, ``pipeline.measure_from_labels``, ``annotation.prepare``,
    ``training_pair.write_training_pair``); what is left here is moving arrays and geometry between nodes and
    the library's types, and the nodes' names, colours, columns and view settings.
    """

    SOURCE_VOLUME_ROLE = "LumbarBMD.SourceVolume"  # node reference: result/annotation node -> its CT
    ROLE_ATTRIBUTE = "LumbarBMD.Role"  # "result" | "annotation image" | "annotation"
    GEOMETRY_ATTRIBUTE = "LumbarBMD.LabelGeometry"  # JSON of the sagittal label grid (SagittalGeometry)
    RESULTS_ATTRIBUTE = "LumbarBMD.Results"  # the results.json object (DESIGN.md contract)
    CANAL_ATTRIBUTE = "LumbarBMD.Canal"  # canal.json of an annotation image
    SAGITTAL_VIEW = "Yellow"  # Slicer's sagittal slice view
    VIEW_HEIGHT_MM = 240.0  # field of view height set on the sagittal view (L1–L4 plus T12 and the sacrum)

    #: Results table columns: (name, type, unit, description).
    TABLE_COLUMNS = (
        ("Level", str, "", "lumbar vertebra"),
        ("BMD", float, "mg/cm³", "volumetric BMD, QCT-equivalent (empty when not measured)"),
        ("Category", str, "", "osteoporosis < 80, osteopenia 80–120, normal > 120 mg/cm³"),
        ("Centre x (LPS)", float, "mm", "vertebral body centre, LPS x (left +)"),
        ("Centre y (LPS)", float, "mm", "vertebral body centre, LPS y (posterior +)"),
        ("Centre z (LPS)", float, "mm", "vertebral body centre, LPS z (superior +)"),
        ("Confidence", float, "", "segmentation confidence 0–1 (empty for edited segments)"),
        ("Identified by", str, "", "how the level was numbered on the CT: anchor (T12, sacrum), count, confidence"),
        ("Colour", str, "", "category colour, #RRGGBB"),
        ("Note", str, "", "why a level was not measured"),
    )

    _models: typing.ClassVar[dict] = {}  # (kind, path, device) -> loaded model, shared by all logic instances

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._annotations: dict = {}  # CT node ID -> (geometry key, LumbarBMDLib Annotation)
        self._caseResults: dict = {}  # table node ID -> (its results.json text, the CaseResult it came from)
        # A closed scene takes its nodes along: drop what was cached for them (IDs are reused in a new scene).
        this = weakref.ref(self)
        self._scene = slicer.mrmlScene
        self._closeObserver = self._scene.AddObserver(
            slicer.vtkMRMLScene.EndCloseEvent, lambda caller, event: this() and this().forgetCachedResults())

    def forgetCachedResults(self) -> None:
        """Forget the canal/sagittal images and the results kept for export (after the scene was closed)."""
        self._annotations.clear()
        self._caseResults.clear()

    @staticmethod
    def isInScene(node) -> bool:
        """Whether ``node`` is (still) a node of ``slicer.mrmlScene``: not removed, and its scene not closed."""
        return node is not None and node.GetScene() is not None and bool(slicer.mrmlScene.IsNodePresent(node))

    @staticmethod
    def buttonStates(params, busy: bool = False) -> dict:
        """``{button name in the .ui: enabled}`` for the parameter node ``params`` (None: no parameter node).

        The export buttons are enabled as soon as there is something to export; the folder is checked when they are
        pressed, so that a missing folder gets a sentence, not a grey button.
        """
        idle = not busy and params is not None
        table = params.table if params is not None else None
        result = table is not None and bool(table.GetAttribute(LumbarBMDLogic.RESULTS_ATTRIBUTE))
        return {
            "computeButton": idle and params.inputVolume is not None,
            "editSegmentsButton": idle and params.segmentation is not None,
            "recomputeButton": idle and params.segmentation is not None,
            "exportResultsButton": idle and result,
            "createAnnotationButton": idle and params.inputVolume is not None,
            "editAnnotationButton": idle and params.annotationSegmentation is not None,
            "exportTrainingPairButton": idle and params.annotationImage is not None
            and params.annotationSegmentation is not None and bool(params.caseId),
        }

    def getParameterNode(self) -> LumbarBMDParameterNode:
        return LumbarBMDParameterNode(super().getParameterNode())

    # --- volumes: MRML (RAS) <-> library (LPS) -------------------------------------------------------

    @staticmethod
    def _ijkToWorldRAS(volumeNode) -> np.ndarray:
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        ijkToWorld = slicer.util.arrayFromVTKMatrix(ijkToRAS)
        parentTransform = volumeNode.GetParentTransformNode()
        if parentTransform is not None:
            if not parentTransform.IsTransformToWorldLinear():
                raise LumbarBMDError(
                    f"the volume '{volumeNode.GetName()}' is under a non-linear (warping) transform: "
                    "harden the transform (Data module) before measuring BMD"
                )
            toWorld = vtk.vtkMatrix4x4()
            parentTransform.GetMatrixTransformToWorld(toWorld)
            ijkToWorld = slicer.util.arrayFromVTKMatrix(toWorld) @ ijkToWorld
        return ijkToWorld

    @classmethod
    def volumeNodeToCTVolume(cls, volumeNode) -> CTVolume:
        """The voxels of a scalar volume node as a :class:`CTVolume` (array (k, j, i) and LPS geometry).

        The voxels are copied (the node's VTK memory is not shared). A linear parent transform is
        applied to the geometry, so the result is in world coordinates; a non-linear one is refused.
        No CT checks here: :meth:`ctVolumeForMeasurement` adds them.
        """
        if volumeNode is None:
            raise LumbarBMDError("no CT volume selected: choose the CT in the input volume selector")
        if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise LumbarBMDError(f"'{volumeNode.GetName()}' is not a CT volume: choose a scalar (grey-value) volume")
        imageData = volumeNode.GetImageData()
        if imageData is None or imageData.GetNumberOfPoints() == 0:
            raise LumbarBMDError(f"the volume '{volumeNode.GetName()}' holds no image: load the CT again")
        if imageData.GetNumberOfScalarComponents() != 1:
            raise LumbarBMDError(
                f"the volume '{volumeNode.GetName()}' has {imageData.GetNumberOfScalarComponents()} values per "
                "voxel (colour or vector image): choose a CT in Hounsfield units"
            )
        affineLPS = LPS_TO_RAS @ cls._ijkToWorldRAS(volumeNode)
        axes = affineLPS[:3, :3]
        spacing = np.linalg.norm(axes, axis=0)
        if np.any(spacing <= 0):
            raise LumbarBMDError(f"the volume '{volumeNode.GetName()}' has a zero voxel size: check its geometry")
        return CTVolume(
            hu=np.array(slicer.util.arrayFromVolume(volumeNode), copy=True),
            spacing=tuple(spacing),
            origin=tuple(affineLPS[:3, 3]),
            direction=axes / spacing,
            source=f"MRML node '{volumeNode.GetName()}'",
            metadata={"mrml_node_id": volumeNode.GetID(), "mrml_node_name": volumeNode.GetName()},
        )

    @classmethod
    def ctVolumeForMeasurement(cls, volumeNode) -> CTVolume:
        """The CT of a volume node, checked as ``lumbarbmd run`` checks a file and reoriented to axial LPS.

        Raises LumbarBMDError with the library's sentence for a thin slab, odd spacing, NaNs, MR-like intensities...
        """
        raw = cls.volumeNodeToCTVolume(volumeNode)
        storage = volumeNode.GetStorageNode()
        fileName = storage.GetFileName() if storage is not None else None
        return validated_ct(raw.to_sitk(), f"the volume '{volumeNode.GetName()}'",
                            {**raw.metadata, "file": fileName})

    @staticmethod
    def ctVolumeToVolumeNode(volume: CTVolume, name: str = "CT"):
        """A new ``vtkMRMLScalarVolumeNode`` in ``slicer.mrmlScene`` holding ``volume`` (voxels copied).

        Its IJKToRAS is ``diag(-1, -1, 1, 1) @ volume.affine``.
        """
        hu = np.asarray(volume.hu)
        if hu.ndim != 3:
            raise LumbarBMDError(f"expected a 3-D CT volume, got an array of shape {hu.shape}")
        ijkToRAS = LPS_TO_RAS @ volume.affine
        return slicer.util.addVolumeFromArray(np.ascontiguousarray(hu), ijkToRAS=ijkToRAS, name=name)

    @staticmethod
    def volumeSummary(volumeNode) -> str:
        """One line for the status label: the volume's size and voxel spacing."""
        if volumeNode is None or volumeNode.GetImageData() is None:
            return "Select the CT volume (abdomen or lumbar spine)."
        dims = volumeNode.GetImageData().GetDimensions()
        spacing = volumeNode.GetSpacing()
        return (
            f"'{volumeNode.GetName()}': {dims[0]} × {dims[1]} × {dims[2]} voxels, "
            f"{spacing[0]:.2f} × {spacing[1]:.2f} × {spacing[2]:.2f} mm."
        )

    # --- sagittal label grids ------------------------------------------------------------------------

    @staticmethod
    def geometryToJSON(geometry: SagittalGeometry) -> str:
        return json.dumps(dataclasses.asdict(geometry))

    @staticmethod
    def geometryFromJSON(text: str) -> SagittalGeometry:
        values = json.loads(text)
        values["origin_lps"] = tuple(values["origin_lps"])
        return SagittalGeometry(**values)

    @staticmethod
    def _sagittalNode(array: np.ndarray, geometry: SagittalGeometry, name: str, className: str):
        """A volume node holding ``array`` ``(n_slices, rows, cols)`` on the sagittal grid ``geometry``."""
        return slicer.util.addVolumeFromArray(np.ascontiguousarray(array), ijkToRAS=LPS_TO_RAS @ geometry.affine,
                                              name=name, nodeClassName=className)

    @staticmethod
    def _levelColorNode():
        """A temporary colour table: 0 background, 1–4 = L1–L4 in the level colours of DESIGN.md."""
        colorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", "LumbarBMD levels")
        colorNode.SetTypeToUser()
        colorNode.SetNumberOfColors(len(LEVEL_NAMES) + 1)
        colorNode.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
        for value, name in enumerate(LEVEL_NAMES, start=1):
            colorNode.SetColor(value, name, *(c / 255.0 for c in LEVEL_COLOURS[value]), 1.0)
        return colorNode

    @staticmethod
    def levelSegmentIds(segmentationNode) -> dict:
        """``{"L1": segment ID, ...}`` of the segments named L1..L4 (case and spaces ignored); others are ignored."""
        segmentation = segmentationNode.GetSegmentation()
        found = {}
        for i in range(segmentation.GetNumberOfSegments()):
            name = segmentation.GetNthSegment(i).GetName().strip().upper()
            if name in LEVEL_NAMES:
                if name in found:
                    raise LumbarBMDError(
                        f"two segments of '{segmentationNode.GetName()}' are named {name}: rename or delete one"
                    )
                found[name] = segmentation.GetNthSegmentID(i)
        return found

    def setLevelSegments(self, segmentationNode, labels: np.ndarray, geometry: SagittalGeometry,
                         geometryReferenceNode) -> None:
        """Replace the segments of ``segmentationNode`` by L1..L4 from a label image.

        Args:
            labels: uint8 ``(rows, cols)`` (0 background, 1–4 = L1–L4) on the single-slice grid ``geometry``.
            geometryReferenceNode: the volume the Segment Editor offers as source volume (the CT for results, the
                annotation image for annotators). The segments' own grid stays the sagittal label grid, so painting
                on the sagittal view edits exactly the image the measurement reads.

        Every level gets a segment, with ID and name "L1".."L4" in its colour, empty when it was not found, so that a
        missed level can be painted.
        """
        labels = np.asarray(labels, dtype=np.uint8).reshape(1, geometry.size, geometry.size)
        labelNode = self._sagittalNode(labels, geometry, "LumbarBMD labels", "vtkMRMLLabelMapVolumeNode")
        wasModified = segmentationNode.StartModify()
        try:
            segmentationNode.CreateDefaultDisplayNodes()
            segmentation = segmentationNode.GetSegmentation()
            segmentation.RemoveAllSegments()
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(labelNode)
            segmentationNode.SetNodeReferenceID(segmentationNode.GetReferenceImageGeometryReferenceRole(),
                                                geometryReferenceNode.GetID())
            ids = vtk.vtkStringArray()
            for value, name in enumerate(LEVEL_NAMES, start=1):
                segmentation.AddEmptySegment(name, name, [c / 255.0 for c in LEVEL_COLOURS[value]])
                ids.InsertNextValue(name)
            if labels.any() and not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                labelNode, segmentationNode, ids
            ):
                raise LumbarBMDError(f"could not write the L1–L4 labels into '{segmentationNode.GetName()}'")
            segmentationNode.SetAttribute(self.GEOMETRY_ATTRIBUTE, self.geometryToJSON(geometry))
            display = segmentationNode.GetDisplayNode()
            display.SetVisibility(True)
            display.SetOpacity2DFill(0.45)
        finally:  # a failed import must not leave the segmentation deaf to Modified events
            segmentationNode.EndModify(wasModified)
            slicer.mrmlScene.RemoveNode(labelNode)

    def labelGeometry(self, segmentationNode) -> SagittalGeometry | None:
        """The sagittal label grid recorded on a segmentation made by this module (None for other segmentations)."""
        text = segmentationNode.GetAttribute(self.GEOMETRY_ATTRIBUTE)
        return self.geometryFromJSON(text) if text else None

    @staticmethod
    def _segmentIsEmpty(segmentationNode, segmentId) -> bool:
        image = slicer.vtkOrientedImageData()
        segmentationNode.GetBinaryLabelmapRepresentation(segmentId, image)
        if image.IsEmpty() or image.GetPointData().GetScalars() is None:
            return True
        return image.GetScalarRange()[1] <= 0

    def labelsFromSegmentation(self, segmentationNode, geometry: SagittalGeometry) -> np.ndarray:
        """The segments named L1..L4 as a uint8 label image ``(rows, cols)`` on the single-slice grid ``geometry``.

        Slicer resamples the segments onto the grid (so segments painted in another geometry still count); the
        label value follows the segment's name, not its order.
        """
        ids = {name: segmentId for name, segmentId in self.levelSegmentIds(segmentationNode).items()
               if not self._segmentIsEmpty(segmentationNode, segmentId)}  # Slicer cannot resample an empty one
        zeros = np.zeros((1, geometry.size, geometry.size), dtype=np.uint8)
        referenceNode = self._sagittalNode(zeros, geometry, "LumbarBMD grid", "vtkMRMLScalarVolumeNode")
        labelNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "LumbarBMD export")
        colorNode = self._levelColorNode()
        try:
            if not ids:
                return zeros[0]
            segmentIds = vtk.vtkStringArray()
            for name in LEVEL_NAMES:
                if name in ids:
                    segmentIds.InsertNextValue(ids[name])
            # the colour table maps each segment to a label value by its name ("l2 " is read as L2)
            for name, segmentId in ids.items():
                segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
                if segment.GetName() != name:
                    segment.SetName(name)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentationNode, segmentIds, labelNode, referenceNode,
                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, colorNode,
            ):
                raise LumbarBMDError(f"could not read the segments of '{segmentationNode.GetName()}'")
            return np.array(slicer.util.arrayFromVolume(labelNode), dtype=np.uint8).reshape(geometry.size,
                                                                                             geometry.size)
        finally:
            for node in (referenceNode, labelNode, colorNode):
                slicer.mrmlScene.RemoveNode(node)

    # --- computing ------------------------------------------------------------------------------------

    def computeSettings(self) -> ComputeSettings:
        p = self.getParameterNode()
        return ComputeSettings(p.device or "auto", p.segmentationModelPath, p.regressionModelPath, p.calibrationPath)

    @classmethod
    def loadModel(cls, kind: str, path: str, device: str):
        """The segmentation ("segmentation") or regression ("regression") model, loaded once per (path, device)."""
        key = (kind, os.path.abspath(path) if path else "", device)
        if key not in cls._models:
            if kind == "segmentation":
                from LumbarBMDLib.segmentation import SegmentationModel as Model
            else:
                from LumbarBMDLib.regression import RegressionModel as Model
            cls._models[key] = Model.load(path or None, device=device)
        return cls._models[key]

    @staticmethod
    def _calibration(settings: ComputeSettings):
        if not settings.calibrationPath:
            return None
        from LumbarBMDLib.calibration import read_calibration

        return read_calibration(settings.calibrationPath)

    def measureVolume(self, volume: CTVolume, settings: ComputeSettings, progress=None) -> Measurement:
        """The whole pipeline on a CT (no MRML access: safe to run in a worker thread).

        Raises LumbarBMDError when the library does, and when no level could be measured (the scene is then
        left as it was). ``progress(fraction, message)`` is called before each stage; raising
        :class:`~LumbarBMDLib.errors.ComputationCancelled` from it cancels.
        """
        from LumbarBMDLib.pipeline import measure, results_json

        segModel = self.loadModel("segmentation", settings.segmentationModelPath, settings.device)
        bmdModel = self.loadModel("regression", settings.regressionModelPath, settings.device)
        result = measure(volume, segModel, bmdModel, self._calibration(settings), progress)
        results = results_json(result, volume.source, segModel, bmdModel)
        if results["status"] == "failed":
            raise LumbarBMDError(results["error"])
        return Measurement(result, results)

    def compute(self, ctNode=None, progress=None) -> ResultNodes:
        """Measure the CT and show the result: L1–L4 segments, BMD table, sagittal view. Blocking.

        The widget runs :meth:`measureVolume` in a worker thread and :meth:`showResult` afterwards instead.
        """
        ctNode = ctNode or self.getParameterNode().inputVolume
        volume = self.ctVolumeForMeasurement(ctNode)
        return self.showResult(ctNode, self.measureVolume(volume, self.computeSettings(), progress))

    def _nodeFor(self, className: str, ctNode, role: str):
        """The node of ``className`` made by this module for ``ctNode`` in ``role`` (the newest), or None."""
        nodes = slicer.mrmlScene.GetNodesByClass(className)
        match = None
        for i in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(i)
            source = node.GetNodeReference(self.SOURCE_VOLUME_ROLE)
            if node.GetAttribute(self.ROLE_ATTRIBUTE) == role and source is not None \
                    and source.GetID() == ctNode.GetID():
                match = node
        return match

    def _nodeForOrNew(self, className: str, ctNode, role: str, suffix: str) -> tuple:
        """(node, created): this CT's node in ``role``, or a new one named "<CT> ``suffix``" linked to the CT."""
        node = self._nodeFor(className, ctNode, role)
        if node is not None:
            return node, False
        node = slicer.mrmlScene.AddNewNodeByClass(className, slicer.mrmlScene.GenerateUniqueName(
            f"{ctNode.GetName()} {suffix}"))
        node.SetAttribute(self.ROLE_ATTRIBUTE, role)
        node.SetNodeReferenceID(self.SOURCE_VOLUME_ROLE, ctNode.GetID())
        return node, True

    def showResult(self, ctNode, measurement: Measurement) -> ResultNodes:
        """Create or update this CT's L1–L4 segmentation and BMD table, and set the sagittal view. Main thread.

        On an error, the nodes created here are removed again. A CT that left the scene while it was measured (removed,
        or the scene closed) raises :class:`ResultDiscarded` and nothing is created.
        """
        result, results = measurement.result, measurement.results
        if not self.isInScene(ctNode):
            name = ctNode.GetName() if ctNode is not None else ""
            raise ResultDiscarded(f"the CT '{name}' was removed from the scene (or the scene was closed) while it was "
                                  "measured: the result was discarded")
        created = []
        try:
            segmentationNode, new = self._nodeForOrNew("vtkMRMLSegmentationNode", ctNode, "result", "L1-L4")
            created += [segmentationNode] if new else []
            tableNode, new = self._tableFor(segmentationNode, ctNode)
            created += [tableNode] if new else []
            self.setLevelSegments(segmentationNode, result.labels, result.label_geometry, ctNode)
            self.fillResultsTable(tableNode, results)
        except Exception:
            for node in created:
                slicer.mrmlScene.RemoveNode(node)
            raise
        self._annotations[ctNode.GetID()] = (self._geometryKey(ctNode), result.annotation)
        self._keepCaseResult(tableNode, result)
        params = self.getParameterNode()
        params.inputVolume = ctNode
        params.segmentation = segmentationNode
        params.table = tableNode
        self.showInSliceViews(ctNode, segmentationNode, results, result.label_geometry)
        return ResultNodes(segmentationNode, tableNode, results)

    def _tableFor(self, segmentationNode, ctNode) -> tuple:
        """(table node, created): this CT's results table, linked to the segmentation it was measured from."""
        tableNode, created = self._nodeForOrNew("vtkMRMLTableNode", ctNode, "result", "BMD")
        tableNode.SetNodeReferenceID("LumbarBMD.Segmentation", segmentationNode.GetID())
        return tableNode, created

    @staticmethod
    def _geometryKey(ctNode) -> tuple:
        """Changes when the CT's voxels or geometry change (then the cached canal/sagittal images are stale)."""
        return (ctNode.GetImageData().GetMTime(), tuple(LumbarBMDLogic._ijkToWorldRAS(ctNode).ravel()))

    def _annotationFor(self, ctNode):
        """The library's Annotation (CT, canal, sagittal images) of a CT: cached, else computed again."""
        key = self._geometryKey(ctNode)
        cached = self._annotations.get(ctNode.GetID())
        if cached is not None and cached[0] == key:
            return cached[1]
        from LumbarBMDLib.annotation import prepare

        annotation = prepare(self.ctVolumeForMeasurement(ctNode))
        self._annotations[ctNode.GetID()] = (key, annotation)
        return annotation

    def recompute(self, segmentationNode=None, ctNode=None) -> ResultNodes:
        """Re-run localisation, patches and regression from the (edited) L1–L4 segments only; update the table.

        No re-segmentation. Works on the module's result segmentation and on an annotator's segmentation (both record
        their sagittal grid); the levels are read by segment name. Raises LumbarBMDError (table unchanged) when no
        level can be measured.
        """
        params = self.getParameterNode()
        segmentationNode = segmentationNode or params.segmentation
        if segmentationNode is None:
            raise LumbarBMDError("no L1–L4 segmentation to measure: press 'Compute BMD' first")
        ctNode = ctNode or segmentationNode.GetNodeReference(self.SOURCE_VOLUME_ROLE) or params.inputVolume
        if ctNode is None:
            raise LumbarBMDError(f"'{segmentationNode.GetName()}' is not linked to a CT: select the CT and compute BMD")
        annotation = self._annotationFor(ctNode)
        geometry = self.labelGeometry(segmentationNode) or annotation.images.annotation_geometry
        labels = self.labelsFromSegmentation(segmentationNode, geometry)
        if not labels.any():
            raise LumbarBMDError(f"'{segmentationNode.GetName()}' has no L1–L4 segment with any voxel on the "
                                 "sagittal plane of the measurement: paint at least one level")

        from LumbarBMDLib.pipeline import measure_from_labels, results_json

        settings = self.computeSettings()
        bmdModel = self.loadModel("regression", settings.regressionModelPath, settings.device)
        # the scanner assessment (tissues, contrast phase) does not depend on the labels: kept from this CT's result
        previous = next((r for _, r in self._caseResults.values() if getattr(r, "annotation", None) is annotation),
                        None)
        result = measure_from_labels(annotation, labels, geometry, bmdModel, self._calibration(settings),
                                     scanner=getattr(previous, "scanner", None))
        results = results_json(result, annotation.volume.source, None, bmdModel)
        if results["status"] == "failed":
            raise LumbarBMDError(results["error"])
        tableNode, _ = self._tableFor(segmentationNode, ctNode)
        self.fillResultsTable(tableNode, results)
        self._keepCaseResult(tableNode, result)
        params.segmentation = segmentationNode
        params.table = tableNode
        return ResultNodes(segmentationNode, tableNode, results)

    # --- results table ----------------------------------------------------------------------------------

    @staticmethod
    def identifiedBy(vertebra: dict) -> str:
        """How a level was identified, in a few words (the report's words): "T12 and sacrum, 1 below T12 (0.97)"."""
        from LumbarBMDLib.report import identified_by  # on use: the report pulls in scipy, installed on first use

        return identified_by(vertebra, unidentified="")

    @staticmethod
    def resultMessage(results: dict) -> str:
        """One or two sentences on the result for the widget: what was measured and, when partial, what was not; then
        the calibration that mapped the HU and the quality-control flags (transitional anatomy, uncertain
        identification, …)."""
        missing = [v for v in results["vertebrae"] if not v["found"]]
        if results["status"] == "failed":
            return results["error"]
        flags = " ".join(f"QC: {f['message']}." for f in results.get("qc_flags") or [])
        calibration = (results.get("calibration") or {}).get("sentence")
        if calibration:  # which calibration mapped the HU (phantom scan, internal, nominal) and any contrast correction
            flags = f"{calibration} {flags}".strip()
        if not missing:
            return " ".join(["L1–L4 measured.", flags]).strip()
        measured = ", ".join(v["level"] for v in results["vertebrae"] if v["found"])
        why = "; ".join(f"{v['level']}: {v.get('reason', '')}" for v in missing)
        return (f"Partial result: the mean uses {measured} only. Not measured: {why}. Check the segments "
                "('Edit segments') and press 'Recompute BMD' after a correction. " + flags).strip()

    def fillResultsTable(self, tableNode, results: dict) -> None:
        """Write the per-level rows of ``results`` (``results.json``) into the table node, plus the patient's mean,
        category, status and message, and the whole ``results.json``, as node attributes."""
        rows = []
        for v in results["vertebrae"]:
            centre = v["centre_lps"] if v["found"] and v["centre_lps"] else [float("nan")] * 3
            colour = CATEGORY_COLOURS.get(v["category"] or "")
            rows.append({
                "Level": v["level"],
                "BMD": v["bmd_mg_cm3"] if v["bmd_mg_cm3"] is not None else float("nan"),
                "Category": v["category"] or "",
                "Centre x (LPS)": centre[0], "Centre y (LPS)": centre[1], "Centre z (LPS)": centre[2],
                "Confidence": v["confidence"] if v["confidence"] is not None else float("nan"),
                "Identified by": self.identifiedBy(v),
                "Colour": _hex(colour) if colour else "",
                "Note": v.get("reason", "") if not v["found"] else "",
            })
        wasModified = tableNode.StartModify()
        try:
            table = tableNode.GetTable()
            while table.GetNumberOfColumns():
                table.RemoveColumn(0)
            for name, kind, unit, description in self.TABLE_COLUMNS:
                array = vtk.vtkStringArray() if kind is str else vtk.vtkDoubleArray()
                array.SetName(name)
                for row in rows:
                    array.InsertNextValue(row[name])
                table.AddColumn(array)
                tableNode.SetColumnUnitLabel(name, unit)
                tableNode.SetColumnDescription(name, description)
                tableNode.SetColumnTitle(name, f"{name} ({unit})" if unit else name)
            tableNode.SetUseColumnTitleAsColumnHeader(True)
            mean = results["mean_bmd_mg_cm3"]
            tableNode.SetAttribute("LumbarBMD.Status", results["status"])
            tableNode.SetAttribute("LumbarBMD.MeanBMD", "" if mean is None else f"{mean:.1f}")
            tableNode.SetAttribute("LumbarBMD.Category", results["category"] or "")
            tableNode.SetAttribute("LumbarBMD.Message", self.resultMessage(results))
            tableNode.SetAttribute(self.RESULTS_ATTRIBUTE, json.dumps(results))
            if tableNode.GetStorageNode() is None:
                tableNode.AddDefaultStorageNode()
            tableNode.GetStorageNode().SetDefaultWriteFileExtension("csv")  # a '#' in a TSV cell truncates the row
            table.Modified()
        finally:
            tableNode.EndModify(wasModified)

    @classmethod
    def tableRows(cls, tableNode) -> list[dict]:
        """The table's rows as display strings for the widget: level, BMD, category, confidence, note, colour."""
        rows = []
        if tableNode is None or tableNode.GetColumnIndex("Level") < 0:
            return rows
        for r in range(tableNode.GetNumberOfRows()):
            def cell(name, row=r):
                return tableNode.GetCellText(row, tableNode.GetColumnIndex(name))

            bmd = float(cell("BMD") or "nan")
            confidence = float(cell("Confidence") or "nan")
            rows.append({
                "level": cell("Level"),
                "bmd": f"{bmd:.1f}" if np.isfinite(bmd) else "—",
                "category": cell("Category") or "not measured",
                "confidence": f"{confidence:.2f}" if np.isfinite(confidence) else "—",
                "identified": cell("Identified by") if tableNode.GetColumnIndex("Identified by") >= 0 else "",
                "note": cell("Note"),
                "colour": cell("Colour") or NOT_MEASURED_COLOUR,
            })
        return rows

    @staticmethod
    def patientSummary(tableNode) -> dict:
        """The patient's mean BMD and category for the widget: text, colour (#RRGGBB), status and message."""
        if tableNode is None or not tableNode.GetAttribute("LumbarBMD.Status"):
            return {"text": "No result yet.", "colour": NOT_MEASURED_COLOUR, "status": "", "message": ""}
        category = tableNode.GetAttribute("LumbarBMD.Category") or ""
        mean = tableNode.GetAttribute("LumbarBMD.MeanBMD") or ""
        colour = CATEGORY_COLOURS.get(category)
        return {
            "text": f"Mean BMD {mean} mg/cm³: {category}" if mean else "No BMD",
            "colour": _hex(colour) if colour else NOT_MEASURED_COLOUR,
            "status": tableNode.GetAttribute("LumbarBMD.Status"),
            "message": tableNode.GetAttribute("LumbarBMD.Message") or "",
        }

    # --- views --------------------------------------------------------------------------------------------

    def showInSliceViews(self, ctNode, segmentationNode, results: dict, geometry: SagittalGeometry) -> None:
        """CT as background of every slice view; the sagittal view on the canal plane, centred on L1–L4.

        The centre is the mean of the found levels' centres (the label grid's centre when none). Views that do not
        exist (no application) are skipped.
        """
        centres = [v["centre_lps"] for v in results["vertebrae"] if v["found"] and v["centre_lps"]]
        if centres:
            centre = np.mean(np.asarray(centres, dtype=float), axis=0)
        else:
            middle = (geometry.size - 1) / 2.0
            centre = geometry.pixel_to_lps([middle, middle, 0.0])
        centre[0] = geometry.sagittal_x_lps  # exactly on the labels' plane
        ras = (LPS_TO_RAS[:3, :3] @ centre).tolist()
        composites = slicer.mrmlScene.GetNodesByClass("vtkMRMLSliceCompositeNode")
        for i in range(composites.GetNumberOfItems()):
            composites.GetItemAsObject(i).SetBackgroundVolumeID(ctNode.GetID())
        sliceNodes = slicer.mrmlScene.GetNodesByClass("vtkMRMLSliceNode")
        for i in range(sliceNodes.GetNumberOfItems()):
            sliceNode = sliceNodes.GetItemAsObject(i)
            if sliceNode.GetLayoutName() != self.SAGITTAL_VIEW:
                continue
            if sliceNode.HasSliceOrientationPreset("Sagittal"):
                sliceNode.SetOrientationToSagittal()
            else:  # a slice node without Slicer's presets: the same matrix
                sagittal = vtk.vtkMatrix3x3()
                slicer.vtkMRMLSliceNode.GetSagittalSliceToRASMatrix(sagittal)
                sliceNode.GetSliceToRAS().DeepCopy(slicer.util.vtkMatrixFromArray(np.pad(
                    slicer.util.arrayFromVTKMatrix(sagittal), ((0, 1), (0, 1))) + np.diag([0, 0, 0, 1.0])))
                sliceNode.UpdateMatrices()
            dims = sliceNode.GetDimensions()
            aspect = dims[0] / dims[1] if dims[1] else 1.0
            fov = sliceNode.GetFieldOfView()
            sliceNode.SetFieldOfView(self.VIEW_HEIGHT_MM * aspect, self.VIEW_HEIGHT_MM, fov[2])
            sliceNode.JumpSliceByCentering(*ras)
        segmentationNode.GetDisplayNode().SetVisibility(True)

    # --- annotation ------------------------------------------------------------------------------------

    def createAnnotationImage(self, ctNode=None):
        """The annotator's 20-slice mean sagittal image of the CT as a volume node on its exact grid, and a
        segmentation with empty L1..L4 segments (level colours) on the same grid.

        An annotation image of this CT that already exists is refreshed; its segmentation is kept as drawn.
        Returns (image node, segmentation node).
        """
        ctNode = ctNode or self.getParameterNode().inputVolume
        from LumbarBMDLib.annotation import prepare

        annotation = prepare(self.ctVolumeForMeasurement(ctNode))
        self._annotations[ctNode.GetID()] = (self._geometryKey(ctNode), annotation)
        geometry = annotation.images.annotation_geometry
        image = annotation.images.annotation_hu.astype(np.float32)[None]
        imageNode = self._nodeFor("vtkMRMLScalarVolumeNode", ctNode, "annotation image")
        if imageNode is None:
            imageNode = self._sagittalNode(image, geometry, slicer.mrmlScene.GenerateUniqueName(
                f"{ctNode.GetName()} annotation image"), "vtkMRMLScalarVolumeNode")
            imageNode.SetAttribute(self.ROLE_ATTRIBUTE, "annotation image")
            imageNode.SetNodeReferenceID(self.SOURCE_VOLUME_ROLE, ctNode.GetID())
        else:
            imageNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(LPS_TO_RAS @ geometry.affine))
            slicer.util.updateVolumeFromArray(imageNode, image)
        imageNode.SetAttribute(self.GEOMETRY_ATTRIBUTE, self.geometryToJSON(geometry))
        imageNode.SetAttribute(self.CANAL_ATTRIBUTE, json.dumps(annotation.canal_json()))
        imageNode.CreateDefaultDisplayNodes()
        display = imageNode.GetDisplayNode()
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(*WINDOW_HU)

        segmentationNode, new = self._nodeForOrNew("vtkMRMLSegmentationNode", ctNode, "annotation", "annotation")
        if new:  # an existing annotation keeps what was drawn
            self.setLevelSegments(segmentationNode, np.zeros((geometry.size, geometry.size), np.uint8), geometry,
                                  imageNode)
        params = self.getParameterNode()
        params.inputVolume = ctNode
        params.annotationImage = imageNode
        params.annotationSegmentation = segmentationNode
        if not params.caseId:
            params.caseId = self.suggestedCaseId(ctNode)
        return imageNode, segmentationNode

    @staticmethod
    def suggestedCaseId(ctNode) -> str:
        """A folder-safe case id from the CT node's name ("CT 3: Abdomen" -> "CT_3_Abdomen")."""
        text = re.sub(r"[^A-Za-z0-9_.\-]+", "_", ctNode.GetName()).strip("_.-")
        return text or "case"

    def referenceValues(self) -> dict:
        """The QCT reference BMD per level entered in the widget (levels left at 0 are omitted)."""
        params = self.getParameterNode()
        values = {name: getattr(params, f"qct{name}") for name in LEVEL_NAMES}
        return {name: float(v) for name, v in values.items() if v and v > 0}

    def exportTrainingPair(self, datasetFolder: str | None = None, caseId: str | None = None,
                           referenceBMD: dict | None = None, overwrite: bool | None = None,
                           imageNode=None, segmentationNode=None) -> Path:
        """Write the annotation image, its L1–L4 label image and ``annotation.json`` into
        ``datasetFolder/caseId/``, plus the CT and ``bmd_reference.csv`` rows when QCT reference values are given
        (the formats ``train-seg`` and ``train-bmd`` read). Arguments default to the parameter node. Returns the
        case folder.
        """
        params = self.getParameterNode()
        datasetFolder = datasetFolder if datasetFolder is not None else params.datasetFolder
        caseId = caseId if caseId is not None else params.caseId
        referenceBMD = referenceBMD if referenceBMD is not None else self.referenceValues()
        overwrite = params.overwriteCase if overwrite is None else overwrite
        imageNode = imageNode or params.annotationImage
        segmentationNode = segmentationNode or params.annotationSegmentation
        datasetFolder = self.chosenFolder(datasetFolder, "dataset folder", "Annotation > Dataset folder")
        if imageNode is None or segmentationNode is None:
            raise LumbarBMDError("no annotation image: press 'Create annotation image' and draw L1–L4 first")
        image = self.volumeNodeToCTVolume(imageNode).to_sitk(np.float32)
        try:
            geometry = SagittalGeometry.from_image(image)
        except ValueError:
            raise LumbarBMDError(f"'{imageNode.GetName()}' is not an annotation image made by this module") from None
        labels = geometry.to_sitk(self.labelsFromSegmentation(segmentationNode, geometry))
        ctNode = imageNode.GetNodeReference(self.SOURCE_VOLUME_ROLE)
        ct = self.ctVolumeForMeasurement(ctNode) if referenceBMD and ctNode is not None else None
        storage = ctNode.GetStorageNode() if ctNode is not None else None
        source = (storage.GetFileName() if storage is not None and storage.GetFileName() else
                  f"MRML node '{ctNode.GetName()}'" if ctNode is not None else "")
        canal = imageNode.GetAttribute(self.CANAL_ATTRIBUTE)
        extra = {"canal": json.loads(canal) if canal else None, "segmentation_node": segmentationNode.GetName(),
                 "tool": "3D Slicer module LumbarBMD"}
        return write_training_pair(datasetFolder, caseId, image, labels, source, referenceBMD, ct, overwrite, extra)

    # --- exporting the result (the files `lumbarbmd run` writes) -----------------------------------------------

    @staticmethod
    def chosenFolder(value, what: str, where: str) -> Path:
        """The folder the user chose for an export, as an absolute path; a LumbarBMDError when none was chosen ("")
        or it is relative (it would land in Slicer's working directory, which nobody chose)."""
        text = str(value or "").strip()
        if not text:
            raise LumbarBMDError(f"choose the {what} first ({where}): nothing was written")
        path = Path(text).expanduser()
        if not path.is_absolute():
            raise LumbarBMDError(f"the {what} '{text}' is not a full path (it would be inside Slicer's working "
                                 f"directory): choose the folder with the folder button ({where}); nothing was written")
        return path

    def _keepCaseResult(self, tableNode, result) -> None:
        """Remember the library's CaseResult behind the table's current results.json (the report needs its images)."""
        self._caseResults[tableNode.GetID()] = (tableNode.GetAttribute(self.RESULTS_ATTRIBUTE), result)

    def exportResults(self, folder=None, tableNode=None) -> Path:
        """Write the current result of ``tableNode`` (default: the parameter node's table) into ``folder/<case>/``:
        ``results.json``, ``results.csv``, ``report.html``, ``sagittal.nii.gz`` and ``sagittal_labels.nii.gz``, the
        files ``lumbarbmd run`` writes, written by the same library function (``batch.write_case_outputs``: complete
        or not at all), then ``folder/summary.csv`` (``batch.write_summary``). After an edit, the result is the
        recomputed one. Returns the case folder.

        ``<case>`` is the CT node's name made folder-safe. A folder of that name that is not a Lumbar BMD result, or
        holds the result of another CT, is never replaced (LumbarBMDError; nothing is written).
        """
        params = self.getParameterNode()
        folder = self.chosenFolder(folder if folder is not None else params.resultsFolder, "results folder",
                                   "Results > Results folder")
        tableNode = tableNode or params.table
        text = tableNode.GetAttribute(self.RESULTS_ATTRIBUTE) if tableNode is not None else None
        if not text:
            raise LumbarBMDError("no result to export: press 'Compute BMD' first")
        cached = self._caseResults.get(tableNode.GetID())
        if cached is None or cached[0] != text:
            raise LumbarBMDError("the images behind this result are no longer in memory (the scene was reloaded, or "
                                 "the result was computed in another session): press 'Recompute BMD', then export")
        from LumbarBMDLib.batch import read_previous, write_case_outputs, write_summary
        from LumbarBMDLib.durable import case_lock, check_writable_folder

        results = json.loads(text)
        ctNode = tableNode.GetNodeReference(self.SOURCE_VOLUME_ROLE)
        caseId = results.get("case_id") or (self.suggestedCaseId(ctNode) if ctNode is not None else "case")
        results["case_id"] = caseId
        out = check_writable_folder(folder, "results folder")
        target = out / caseId
        with case_lock(out, caseId):
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                raise LumbarBMDError(f"{target} exists and is not a folder: choose another results folder; nothing "
                                     "was written")
            if target.exists():
                previous, why = read_previous(target)
                if previous is None:
                    raise LumbarBMDError(f"{target} exists and is not a Lumbar BMD result ({why}): choose another "
                                         "results folder; nothing was written")
                if previous.get("input") != results.get("input"):
                    raise LumbarBMDError(f"{target} holds the result of another CT ({previous.get('input')}): choose "
                                         "another results folder or rename the CT; nothing was written")
            try:
                write_case_outputs(target, results, cached[1])
            except OSError as err:
                raise LumbarBMDError(f"could not write {target}: {err.strerror or err}; nothing was written") from None
        write_summary(out)
        return target


#
# LumbarBMDTest
#


def _obliqueDirection(degrees: float) -> np.ndarray:
    """Rotation by ``degrees`` about the S axis, then about the L axis: an oblique, right-handed frame."""
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    aboutS = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    aboutL = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return aboutL @ aboutS


class LumbarBMDTest(ScriptedLoadableModuleTest):
    """Slicer self-test of the module (also runnable headless on a slicer-core scene).

    It needs the packages the module installs on first use (torch, MONAI, ...). In an interactive Slicer it offers to
    install them; in testing mode (``--testing``: ctest, the extension build machines) and without the application it
    never installs anything and is skipped, with a message naming what is missing.
    """

    requirements = dependencies.RUNTIME_REQUIREMENTS

    def setUp(self) -> None:
        """Reset the state: a clear scene."""
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        """Run as few or as many tests as needed here."""
        self.ensureDependenciesOrSkip()
        self.setUp()
        self.test_volume_roundtrip()
        self.setUp()
        self.test_whole_flow_on_a_phantom()
        self.setUp()
        self.test_closing_the_scene_discards_the_running_result()
        slicer.mrmlScene.Clear()

    def ensureDependenciesOrSkip(self) -> None:
        """Return when the dependencies are there (installing them after asking, in an interactive Slicer); otherwise
        skip the test (``unittest.SkipTest``) with a message that says what is missing and what to do."""
        plan = dependencies.install_plan(self.requirements)
        if plan.nothing_to_do:
            return
        app = getattr(slicer, "app", None)
        interactive = app is not None and not app.testingEnabled()
        if interactive and plan.problem is None and installDependencies(ask=True, requirements=self.requirements):
            return
        reason = plan.problem or ("these Python packages are not installed: "
                                  + ", ".join(str(r) for r in plan.to_install))
        message = (f"LumbarBMD self-test skipped: {reason}. Open Lumbar BMD and press 'Compute BMD' once to install "
                   "them (the module asks first), then run the test again.")
        logging.warning(message)
        self.skipTest(message)

    def test_volume_roundtrip(self) -> None:
        """CTVolume -> volume node -> CTVolume keeps voxels and the LPS geometry of an oblique CT."""
        logging.info("LumbarBMD self-test: volume round trip")
        rng = np.random.default_rng(20240601)
        hu = rng.integers(-1024, 1500, size=(5, 6, 7), dtype=np.int16)
        volume = CTVolume(
            hu=hu, spacing=(0.7, 0.8, 2.5), origin=(-100.0, -120.0, 50.0), direction=_obliqueDirection(30.0)
        )
        logic = LumbarBMDLogic()

        node = logic.ctVolumeToVolumeNode(volume, "LumbarBMDSelfTestCT")
        self.assertTrue(node.IsA("vtkMRMLScalarVolumeNode"))
        self.assertEqual(node.GetName(), "LumbarBMDSelfTestCT")
        ijkToRAS = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(ijkToRAS)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(ijkToRAS), LPS_TO_RAS @ volume.affine, atol=1e-9)

        # A voxel's RAS position in Slicer is its LPS position with x and y negated.
        ijk = np.array([6.0, 2.0, 3.0])
        lps = volume.index_to_lps(ijk)
        ras = slicer.util.arrayFromVTKMatrix(ijkToRAS) @ np.append(ijk, 1.0)
        np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-9)

        back = logic.volumeNodeToCTVolume(node)
        self.assertEqual(back.hu.dtype, hu.dtype)
        np.testing.assert_array_equal(back.hu, hu)
        np.testing.assert_allclose(back.spacing, volume.spacing, atol=1e-9)
        np.testing.assert_allclose(back.origin, volume.origin, atol=1e-9)
        np.testing.assert_allclose(back.direction, volume.direction, atol=1e-9)
        np.testing.assert_allclose(back.affine, volume.affine, atol=1e-9)

        slicer.mrmlScene.RemoveNode(node)
        logging.info("LumbarBMD self-test passed")

    def test_whole_flow_on_a_phantom(self) -> None:
        """Compute on a phantom CT, erase L2, recompute and export the results, create the annotation image, draw and
        export a pair."""
        import SimpleITK as sitk

        from LumbarBMDLib.phantom import generate_case

        logging.info("LumbarBMD self-test: whole flow on a phantom CT")
        case = generate_case(99_302, "A", "small")
        logic = LumbarBMDLogic()
        logic.getParameterNode().device = "cpu"
        ctNode = logic.ctVolumeToVolumeNode(case.ct, "LumbarBMD phantom CT")

        nodes = logic.compute(ctNode)
        segmentation = nodes.segmentation.GetSegmentation()
        self.assertEqual([segmentation.GetNthSegment(i).GetName() for i in range(4)], list(LEVEL_NAMES))
        self.assertEqual(nodes.results["status"], "ok")
        for row in logic.tableRows(nodes.table):
            self.assertLess(abs(float(row["bmd"]) - case.truth["bmd_mg_cm3"][row["level"]]), 12.0)

        # the radiologist erases L2 and recomputes: L2 is reported missing
        empty = np.zeros_like(slicer.util.arrayFromSegmentBinaryLabelmap(nodes.segmentation, "L2", ctNode))
        slicer.util.updateSegmentBinaryLabelmapFromArray(empty, nodes.segmentation, "L2", ctNode)
        edited = logic.recompute()
        self.assertEqual(edited.results["status"], "partial")
        self.assertEqual(logic.tableRows(edited.table)[1]["bmd"], "—")

        # the edited result is exported as `lumbarbmd run` writes a case
        with tempfile.TemporaryDirectory() as out:
            folder = logic.exportResults(out)
            with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
                exported = json.load(f)
            self.assertEqual(exported["status"], "partial")
            self.assertEqual([v["found"] for v in exported["vertebrae"]], [True, False, True, True])
            for name in ("results.csv", "report.html", "sagittal.nii.gz", "sagittal_labels.nii.gz"):
                self.assertTrue(os.path.isfile(os.path.join(folder, name)), name)
            self.assertTrue(os.path.isfile(os.path.join(out, "summary.csv")))

        # the annotator draws the phantom's vertebral bodies on the annotation image and exports the pair
        imageNode, annotationNode = logic.createAnnotationImage(ctNode)
        geometry = logic.labelGeometry(annotationNode)
        truth = sitk.GetImageFromArray(case.labels.astype(np.uint8))
        truth.CopyInformation(case.ct.to_sitk())
        drawn = sitk.GetArrayFromImage(sitk.Resample(truth, geometry.reference_image(), sitk.Transform(),
                                                     sitk.sitkNearestNeighbor, 0))[0]
        drawn[drawn > 4] = 0
        logic.setLevelSegments(annotationNode, drawn, geometry, imageNode)
        with tempfile.TemporaryDirectory() as dataset:
            folder = logic.exportTrainingPair(dataset, "selftest", {"L3": case.truth["bmd_mg_cm3"]["L3"]})
            labels = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "annotation_labels.nii.gz")))
            np.testing.assert_array_equal(labels[0], drawn)
            self.assertTrue(os.path.isfile(os.path.join(dataset, "bmd_reference.csv")))
        logging.info("LumbarBMD self-test passed: whole flow")

    def test_closing_the_scene_discards_the_running_result(self) -> None:
        """The scene is closed while a CT is measured (the widget keeps processing events): the result is not applied
        to the removed CT, and nothing is added to the new scene."""
        from LumbarBMDLib.phantom import generate_case

        logging.info("LumbarBMD self-test: scene closed during a computation")
        case = generate_case(99_303, "A", "small")
        logic = LumbarBMDLogic()
        logic.getParameterNode().device = "cpu"
        ctNode = logic.ctVolumeToVolumeNode(case.ct, "LumbarBMD phantom CT")
        volume = logic.ctVolumeForMeasurement(ctNode)
        measurement = logic.measureVolume(volume, logic.computeSettings())  # what the worker thread computes
        slicer.mrmlScene.Clear()  # the user closes the scene meanwhile
        with self.assertRaises(ResultDiscarded):
            logic.showResult(ctNode, measurement)
        for className in ("vtkMRMLSegmentationNode", "vtkMRMLTableNode"):
            self.assertEqual(slicer.mrmlScene.GetNodesByClass(className).GetNumberOfItems(), 0, className)
        self.assertIsNone(logic.getParameterNode().segmentation)
        logging.info("LumbarBMD self-test passed: scene closed during a computation")
