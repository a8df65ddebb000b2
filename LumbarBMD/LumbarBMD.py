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

import logging
import os
import sys

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
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.volume import CTVolume

#: LPS <-> RAS: negate x and y (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

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
        self.parent.contributors = ["LumbarBMD developers"]
        self.parent.helpText = f"""
Opportunistic lumbar bone mineral density (volumetric BMD in mg/cm³, QCT-equivalent) from a routine
abdominal or spine CT. The module finds the spinal canal, reslices the CT sagittally through it,
segments L1–L4 with an R2U-Net, regresses the BMD of each vertebral body with a DenseNet-121 and
classifies the patient as osteoporosis (&lt; 80), osteopenia (80–120) or normal (&gt; 120 mg/cm³).
<p>See the <a href="{README_URL}">README</a> for installation, usage and the command line tool.</p>
<p>LumbarBMD version {LumbarBMDLib.__version__}. Not a medical device: for research use.</p>
"""
        self.parent.acknowledgementText = """
The method follows the published approach to lumbar BMD from CT: R2U-Net segmentation of L1–L4 on a
canal-centred sagittal image, and DenseNet-121 regression of volumetric BMD from trabecular patches.
Example data: TotalSegmentator example CT (Apache-2.0).
"""


#
# LumbarBMDWidget
#


class LumbarBMDWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI only: loads the .ui file and wires it to :class:`LumbarBMDLogic`. No algorithm here."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        # Load widget from .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LumbarBMD.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # Set scene in MRML widgets: the .ui connects mrmlSceneChanged(vtkMRMLScene*) to the selectors.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = LumbarBMDLogic()

        self.ui.computeButton.enabled = False
        self.ui.computeButton.toolTip = (
            "Computing BMD (canal, sagittal reslice, L1–L4 segmentation, regression) arrives in a later version."
        )

        # Observe the scene so the parameter node is recreated after "Close scene".
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # GUI -> parameter node
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.GetNodeReference(LumbarBMDLogic.INPUT_VOLUME_REFERENCE):
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.SetNodeReferenceID(LumbarBMDLogic.INPUT_VOLUME_REFERENCE, firstVolume.GetID())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        try:
            inputVolume = self._parameterNode.GetNodeReference(LumbarBMDLogic.INPUT_VOLUME_REFERENCE)
            wasBlocked = self.ui.inputVolumeSelector.blockSignals(True)
            self.ui.inputVolumeSelector.setCurrentNode(inputVolume)
            self.ui.inputVolumeSelector.blockSignals(wasBlocked)
            self.ui.statusLabel.text = self.logic.volumeSummary(inputVolume)
            self.ui.computeButton.enabled = False  # the pipeline arrives in a later version
        finally:
            self._updatingGUIFromParameterNode = False

    def updateParameterNodeFromGUI(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self._parameterNode.SetNodeReferenceID(
            LumbarBMDLogic.INPUT_VOLUME_REFERENCE, self.ui.inputVolumeSelector.currentNodeID
        )


#
# LumbarBMDLogic
#


class LumbarBMDLogic(ScriptedLoadableModuleLogic):
    """MRML adapter between Slicer nodes and ``LumbarBMDLib``. Holds no algorithm and needs no Qt.

    RAS (MRML) <-> LPS (the library) conversion happens here and nowhere else.
    """

    INPUT_VOLUME_REFERENCE = "InputVolume"

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    @staticmethod
    def volumeNodeToCTVolume(volumeNode) -> CTVolume:
        """The CT of a scalar volume node as a :class:`CTVolume` (HU array (k, j, i) and LPS geometry).

        The voxels are copied (the node's VTK memory is not shared). A linear parent transform is
        applied to the geometry, so the result is in world coordinates; a non-linear one is refused.
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

        affineLPS = LPS_TO_RAS @ ijkToWorld
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
    """Slicer self-test of the module (also runnable headless on a slicer-core scene)."""

    def setUp(self) -> None:
        """Reset the state: a clear scene."""
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_volume_roundtrip()

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
