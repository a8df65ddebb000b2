"""The Slicer module's Logic on a real slicer-core MRML scene, with the shipped models and phantom CTs.

What a radiologist and an annotator do in Slicer, without the application: compute → segments and table; edit a
segment through its array → recompute; annotation image → draw → export → the training readers accept it;
save and reload the scene → results intact. Every check compares with the phantom's truth or with the library
run directly (the Logic must add no algorithm of its own).
"""

# The fixtures are imported from slicer_fixtures and requested by name as test arguments:
# ruff: noqa: F811

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk
from slicer_fixtures import (  # noqa: F401  (fixtures are used by name)
    allow_vtk_errors,
    lumbarbmd_module,
    mrml,
    new_mrml_env,
    scripted_module_stub,
    use_scene,
    vtk_messages,
)
from vtk.util.numpy_support import vtk_to_numpy

from LumbarBMDLib.bmd_training import case_reference, find_bmd_cases, read_reference
from LumbarBMDLib.errors import ComputationCancelled, LumbarBMDError
from LumbarBMDLib.figures import CATEGORY_COLOURS, LEVEL_COLOURS
from LumbarBMDLib.localisation import REASON_NOT_LABELLED
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.pipeline import measure, results_json
from LumbarBMDLib.regression import RegressionModel
from LumbarBMDLib.seg_training import find_pairs, load_pair
from LumbarBMDLib.segmentation import SegmentationModel
from LumbarBMDLib.volume import CTVolume

pytestmark = pytest.mark.slicer

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
LEVELS = ("L1", "L2", "L3", "L4")


@pytest.fixture(scope="module")
def case():
    """A vendor-A small phantom with a seed never used in training."""
    return generate_case(99_301, "A", "small")


@pytest.fixture(scope="module")
def direct(case):
    """The library run directly on the same CT: what the Logic must reproduce exactly."""
    seg, bmd = SegmentationModel.load(device="cpu"), RegressionModel.load(device="cpu")
    # as the Logic sees it: a volume node carries no DICOM kVp (the phantom's in-memory CT does)
    result = measure(replace(case.ct, metadata={}), seg, bmd)
    return result, results_json(result, "direct", seg, bmd)


@pytest.fixture
def logic(lumbarbmd_module, mrml):
    logic = lumbarbmd_module.LumbarBMDLogic()
    logic.getParameterNode().device = "cpu"
    return logic


@pytest.fixture
def ct_node(logic, case):
    return logic.ctVolumeToVolumeNode(case.ct, "Phantom CT")


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def segment_voxels_lps(segmentation_node, segment_id) -> np.ndarray:
    """LPS points (N, 3) of a segment's voxels, read from its own oriented labelmap (independent of the Logic)."""
    image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    dims = image.GetDimensions()
    values = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    k, j, i = np.nonzero(values)
    extent = image.GetExtent()
    ijk = np.stack([i + extent[0], j + extent[2], k + extent[4], np.ones_like(i)], axis=1).astype(float)
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    ras = ijk @ slicer.util.arrayFromVTKMatrix(m).T
    return (ras @ LPS_TO_RAS.T)[:, :3]


def truth_label_at(case, lps: np.ndarray) -> np.ndarray:
    index = np.rint(case.ct.lps_to_index(lps)).astype(int)
    nz, ny, nx = case.labels.shape
    inside = (index >= 0).all(axis=1) & (index < [nx, ny, nz]).all(axis=1)
    out = np.zeros(len(lps), dtype=int)
    out[inside] = case.labels[index[inside, 2], index[inside, 1], index[inside, 0]]
    return out


def table_column(table_node, name) -> list[str]:
    col = table_node.GetColumnIndex(name)
    return [table_node.GetCellText(r, col) for r in range(table_node.GetNumberOfRows())]


def number(text: str) -> float:
    return float(text) if text not in ("", "nan") else float("nan")


def add_sagittal_view(scene, presets: bool = True):
    """The nodes Slicer's layout creates for the sagittal (Yellow) view (with the application's orientation presets,
    or without them as a bare scene has)."""
    if presets:
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    slice_node.SetLayoutName("Yellow")
    slice_node.SetOrientationToAxial() if presets else None
    slice_node.SetDimensions(400, 400, 1)
    composite = slicer.vtkMRMLSliceCompositeNode()
    composite.SetLayoutName("Yellow")
    scene.AddNode(composite)
    return slice_node, composite


# --------------------------------------------------------------------------------------
# compute
# --------------------------------------------------------------------------------------
def test_compute_makes_four_named_coloured_segments_on_the_truth(logic, ct_node, case, mrml):
    nodes = logic.compute(ct_node)
    seg = nodes.segmentation
    segmentation = seg.GetSegmentation()
    assert [segmentation.GetNthSegmentID(i) for i in range(4)] == list(LEVELS)
    assert [segmentation.GetNthSegment(i).GetName() for i in range(4)] == list(LEVELS)
    for value, level in enumerate(LEVELS, start=1):
        np.testing.assert_allclose(segmentation.GetSegment(level).GetColor(),
                                   np.array(LEVEL_COLOURS[value]) / 255.0, atol=1e-6)
    # referenced to the CT (the Segment Editor offers it as source volume)
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()).GetID() == ct_node.GetID()
    assert seg.GetNodeReference(logic.SOURCE_VOLUME_ROLE).GetID() == ct_node.GetID()
    # each segment lies on its vertebral body in the phantom's 3-D truth
    for value, level in enumerate(LEVELS, start=1):
        lps = segment_voxels_lps(seg, level)
        assert len(lps) * 0.8 * 0.8 > 300  # mm², a vertebral body on a sagittal plane
        on_truth = truth_label_at(case, lps)
        assert np.mean(on_truth == value) > 0.85, (level, np.bincount(on_truth))
    params = logic.getParameterNode()
    assert params.segmentation.GetID() == seg.GetID() and params.table.GetID() == nodes.table.GetID()
    assert params.inputVolume.GetID() == ct_node.GetID()


def test_compute_table_holds_the_library_values(logic, ct_node, case, direct):
    _, expected = direct
    nodes = logic.compute(ct_node)
    table = nodes.table
    assert table_column(table, "Level") == list(LEVELS)
    assert table.GetColumnUnitLabel("BMD") == "mg/cm³"
    bmd = [number(t) for t in table_column(table, "BMD")]
    # the Logic adds no algorithm: the same numbers as the library on the same CT
    assert bmd == pytest.approx([v["bmd_mg_cm3"] for v in expected["vertebrae"]], abs=0.051)
    for level, value in zip(LEVELS, bmd, strict=True):
        assert abs(value - case.truth["bmd_mg_cm3"][level]) < 12.0
    assert table_column(table, "Category") == [v["category"] for v in expected["vertebrae"]]
    for axis, name in enumerate(("Centre x (LPS)", "Centre y (LPS)", "Centre z (LPS)")):
        got = [number(t) for t in table_column(table, name)]
        assert got == pytest.approx([v["centre_lps"][axis] for v in expected["vertebrae"]], abs=0.01)
    confidence = [number(t) for t in table_column(table, "Confidence")]
    assert all(0.0 < c <= 1.0 for c in confidence)
    for category, colour in zip(table_column(table, "Category"), table_column(table, "Colour"), strict=True):
        assert colour == "#{:02X}{:02X}{:02X}".format(*CATEGORY_COLOURS[category])
    assert table.GetAttribute("LumbarBMD.Status") == "ok"
    assert float(table.GetAttribute("LumbarBMD.MeanBMD")) == pytest.approx(expected["mean_bmd_mg_cm3"], abs=0.051)
    results = json.loads(table.GetAttribute(logic.RESULTS_ATTRIBUTE))
    assert results["status"] == "ok" and results["models"] == expected["models"]

    summary = logic.patientSummary(table)
    assert summary["text"] == f"Mean BMD {expected['mean_bmd_mg_cm3']:.1f} mg/cm³: {expected['category']}"
    assert summary["colour"] == "#{:02X}{:02X}{:02X}".format(*CATEGORY_COLOURS[expected["category"]])
    rows = logic.tableRows(table)
    assert [r["level"] for r in rows] == list(LEVELS) and all(r["bmd"] != "—" for r in rows)
    # each level says how the anatomy identified it: both anchors seen, counted from T12
    assert [r["identified"].split(" (")[0] for r in rows] == [f"T12 and sacrum, {k} below T12" for k in range(1, 5)]

    # computing again updates the same nodes instead of adding new ones
    again = logic.compute(ct_node)
    assert again.segmentation.GetID() == nodes.segmentation.GetID() and again.table.GetID() == table.GetID()


@pytest.mark.parametrize("presets", [True, False])
def test_compute_sets_the_sagittal_view_on_the_canal_plane(logic, ct_node, mrml, direct, presets):
    slice_node, composite = add_sagittal_view(mrml.scene, presets)
    result, expected = direct
    logic.compute(ct_node)
    assert composite.GetBackgroundVolumeID() == ct_node.GetID()
    slice_to_ras = slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS())
    normal, origin = slice_to_ras[:3, 2], slice_to_ras[:3, 3]
    np.testing.assert_allclose(np.abs(normal), [1.0, 0.0, 0.0], atol=1e-9)  # a sagittal plane
    assert -origin[0] == pytest.approx(result.label_geometry.sagittal_x_lps, abs=1e-6)  # RAS R = -LPS x
    z = [v["centre_lps"][2] for v in expected["vertebrae"]]
    assert min(z) < origin[2] < max(z)  # centred on L1–L4
    assert slice_node.GetFieldOfView()[1] == pytest.approx(logic.VIEW_HEIGHT_MM)


def test_compute_reports_progress_and_cancels_without_touching_the_scene(logic, ct_node, mrml):
    seen = []

    def progress(fraction, message):
        seen.append((fraction, message))
        if fraction >= 0.3:
            raise ComputationCancelled("cancelled")

    before = mrml.scene.GetNumberOfNodes()
    with pytest.raises(ComputationCancelled):
        logic.compute(ct_node, progress)
    assert [f for f, _ in seen] == [0.0, 0.3] and "canal" in seen[0][1]
    assert mrml.scene.GetNumberOfNodes() == before
    assert logic.getParameterNode().segmentation is None


def test_compute_failures_raise_the_library_message_and_leave_the_scene_as_it_was(logic, mrml, case):
    rng = np.random.default_rng(3)
    water = CTVolume(hu=np.where(rng.random((40, 64, 64)) < 0.5, -1000, 0).astype(np.int16), spacing=(2, 2, 2.5),
                     origin=(0, 0, 0))
    mr = CTVolume(hu=rng.integers(0, 800, (40, 64, 64)).astype(np.int16), spacing=(1, 1, 2), origin=(0, 0, 0))
    thin = CTVolume(hu=case.ct.hu[:3].copy(), spacing=case.ct.spacing, origin=case.ct.origin)
    expected = {"no spine": "canal", "MR": "do not look like CT", "thin": "only 3 slice"}
    for name, volume in (("no spine", water), ("MR", mr), ("thin", thin)):
        node = logic.ctVolumeToVolumeNode(volume, name)
        before = mrml.scene.GetNumberOfNodes()
        with pytest.raises(LumbarBMDError, match=expected[name]) as error:
            logic.compute(node)
        assert f"the volume '{name}'" in str(error.value) or name == "no spine"
        assert mrml.scene.GetNumberOfNodes() == before, name
    assert logic.getParameterNode().segmentation is None and logic.getParameterNode().table is None
    with pytest.raises(LumbarBMDError, match="no CT volume selected"):
        logic.compute(None)


def test_a_scan_without_sacrum_or_t12_is_refused_not_guessed(logic, mrml, case):
    """Only L1–L2 in view: the numbering has no anchor, so no BMD (a dialog says why); the scene is unchanged."""
    z = case.ct.index_to_lps(np.stack([np.zeros(case.ct.shape[0]), np.zeros(case.ct.shape[0]),
                                       np.arange(case.ct.shape[0])], axis=1))[:, 2]
    labels_z = [z[np.nonzero((case.labels == v).any(axis=(1, 2)))[0]] for v in (1, 2)]
    keep = (z >= min(labels_z[1].min(), labels_z[0].min()) - 2) & (z <= max(labels_z[0].max(), labels_z[1].max()) + 2)
    k = np.nonzero(keep)[0]
    cut = CTVolume(hu=case.ct.hu[k[0]:k[-1] + 1].copy(), spacing=case.ct.spacing,
                   origin=case.ct.index_to_lps([0, 0, k[0]]), direction=case.ct.direction)
    node = logic.ctVolumeToVolumeNode(cut, "L1-L2 only")
    before = mrml.scene.GetNumberOfNodes()
    with pytest.raises(LumbarBMDError, match="cannot be numbered: the scan shows neither the sacrum nor a rib-bearing"):
        logic.compute(node)
    assert mrml.scene.GetNumberOfNodes() == before


# --------------------------------------------------------------------------------------
# edit -> recompute
# --------------------------------------------------------------------------------------
def test_removing_l2_and_recomputing_gives_a_partial_result(logic, ct_node, mrml):
    nodes = logic.compute(ct_node)
    before = {r["level"]: r for r in logic.tableRows(nodes.table)}
    seg = nodes.segmentation
    array = slicer.util.arrayFromSegmentBinaryLabelmap(seg, "L2", ct_node)
    assert array.any()
    slicer.util.updateSegmentBinaryLabelmapFromArray(np.zeros_like(array), seg, "L2", ct_node)

    again = logic.recompute()
    assert again.table.GetID() == nodes.table.GetID()  # the same table, updated
    rows = {r["level"]: r for r in logic.tableRows(again.table)}
    assert rows["L2"]["bmd"] == "—" and rows["L2"]["category"] == "not measured"
    assert rows["L2"]["note"] == REASON_NOT_LABELLED
    for level in ("L1", "L3", "L4"):  # edited labels, same vertebrae: the same values
        assert float(rows[level]["bmd"]) == pytest.approx(float(before[level]["bmd"]), abs=0.15)
        assert rows[level]["confidence"] == "—"  # no network confidence for edited segments
    assert again.table.GetAttribute("LumbarBMD.Status") == "partial"
    mean = np.mean([float(rows[lv]["bmd"]) for lv in ("L1", "L3", "L4")])
    assert float(again.table.GetAttribute("LumbarBMD.MeanBMD")) == pytest.approx(mean, abs=0.1)
    message = logic.patientSummary(again.table)["message"]
    assert message.startswith("Partial result") and "L2" in message
    assert again.results["calibration"]["sentence"] in message  # which calibration mapped the HU, kept after the edit
    assert again.results["level_numbering_anchor"] == "edited labels"
    assert {rows[level]["identified"] for level in ("L1", "L3", "L4")} == {"edited labels"}

    # erasing every level: the library's error, and the table keeps the last result
    for level in ("L1", "L3", "L4"):
        slicer.util.updateSegmentBinaryLabelmapFromArray(np.zeros_like(array), seg, level, ct_node)
    with pytest.raises(LumbarBMDError, match="no L1–L4 segment"):
        logic.recompute()
    assert again.table.GetAttribute("LumbarBMD.Status") == "partial"


def test_recompute_reads_levels_by_name_and_needs_a_segmentation(logic, ct_node, mrml):
    with pytest.raises(LumbarBMDError, match="Compute BMD"):
        logic.recompute()
    nodes = logic.compute(ct_node)
    segmentation = nodes.segmentation.GetSegmentation()
    geometry = logic.labelGeometry(nodes.segmentation)
    original = logic.labelsFromSegmentation(nodes.segmentation, geometry)
    # an annotator reorders the segments and types " l3" by hand: the label values still follow the names
    segmentation.GetSegment("L3").SetName(" l3")
    segmentation.SetSegmentIndex("L4", 0)
    np.testing.assert_array_equal(logic.labelsFromSegmentation(nodes.segmentation, geometry), original)
    segmentation.GetSegment("L1").SetName("L2")
    with pytest.raises(LumbarBMDError, match=r"two segments .* named L2"):
        logic.recompute()


# --------------------------------------------------------------------------------------
# annotation
# --------------------------------------------------------------------------------------
def node_grid(node, pixel_type) -> sitk.Image:
    """An empty SimpleITK image on a node's grid, whose LPS geometry is derived here from IJKToRAS."""
    affine = LPS_TO_RAS @ ijk_to_ras(node)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    ref = sitk.Image(list(slicer.util.arrayFromVolume(node).shape[::-1]), pixel_type)
    ref.SetSpacing(spacing.tolist())
    ref.SetOrigin(affine[:3, 3].tolist())
    ref.SetDirection((affine[:3, :3] / spacing).ravel().tolist())
    return ref


def resample_ct_on(node, case) -> np.ndarray:
    """The CT resampled (linear) onto a node's grid."""
    out = sitk.Resample(case.ct.to_sitk(np.float32), node_grid(node, sitk.sitkFloat32), sitk.Transform(),
                        sitk.sitkLinear, -1024.0)
    return sitk.GetArrayFromImage(out)


def truth_on(node, case) -> np.ndarray:
    """The phantom's truth vertebral bodies L1–L4 (nearest neighbour) on a node's grid."""
    truth = sitk.GetImageFromArray(case.labels.astype(np.uint8))
    truth.CopyInformation(case.ct.to_sitk())
    labels = sitk.GetArrayFromImage(sitk.Resample(truth, node_grid(node, sitk.sitkUInt8), sitk.Transform(),
                                                  sitk.sitkNearestNeighbor, 0))
    return np.where(labels <= 4, labels, 0).astype(np.uint8)


def test_annotation_image_overlays_the_ct(logic, ct_node, case):
    image_node, seg_node = logic.createAnnotationImage(ct_node)
    image = slicer.util.arrayFromVolume(image_node)
    assert image.shape == (1, 512, 512) and image.dtype == np.float32
    # the 20-slice mean matches the CT on the node's own grid (a wrong flip or shift would decorrelate them)
    ct_on_grid = resample_ct_on(image_node, case)
    inside = ct_on_grid > -1000
    assert np.corrcoef(image[inside], ct_on_grid[inside])[0, 1] > 0.9
    # the grid is a true sagittal plane through the canal, rows superior -> inferior, anterior on the left
    affine = LPS_TO_RAS @ ijk_to_ras(image_node)
    np.testing.assert_allclose(affine[:3, :3] / 0.8, [[0, 0, -1], [1, 0, 0], [0, -1, 0]], atol=1e-9)
    # an empty segmentation with L1..L4 in the level colours, on the image's grid
    segmentation = seg_node.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(4)] == list(LEVELS)
    np.testing.assert_allclose(segmentation.GetSegment("L3").GetColor(), np.array(LEVEL_COLOURS[3]) / 255.0)
    assert seg_node.GetNodeReference(seg_node.GetReferenceImageGeometryReferenceRole()).GetID() == image_node.GetID()
    assert not logic.labelsFromSegmentation(seg_node, logic.labelGeometry(seg_node)).any()
    params = logic.getParameterNode()
    assert params.annotationImage.GetID() == image_node.GetID() and params.caseId == "Phantom_CT"

    # creating it again keeps what was drawn
    drawn = truth_on(image_node, case)[0]
    logic.setLevelSegments(seg_node, drawn, logic.labelGeometry(seg_node), image_node)
    image_again, seg_again = logic.createAnnotationImage(ct_node)
    assert image_again.GetID() == image_node.GetID() and seg_again.GetID() == seg_node.GetID()
    np.testing.assert_array_equal(logic.labelsFromSegmentation(seg_again, logic.labelGeometry(seg_again)), drawn)


def draw_truth(seg_node, image_node, case) -> np.ndarray:
    """An annotator paints each vertebral body (the phantom's truth on the image) into its segment."""
    drawn = truth_on(image_node, case)
    for value, level in enumerate(LEVELS, start=1):
        slicer.util.updateSegmentBinaryLabelmapFromArray((drawn == value).astype(np.uint8), seg_node, level,
                                                         image_node)
    return drawn[0]


def test_export_training_pair_reimports_to_the_same_arrays(logic, ct_node, case, tmp_path):
    image_node, seg_node = logic.createAnnotationImage(ct_node)
    drawn = draw_truth(seg_node, image_node, case)
    assert set(np.unique(drawn)) == {0, 1, 2, 3, 4}
    params = logic.getParameterNode()
    params.datasetFolder = str(tmp_path / "dataset")
    params.caseId = "case01"
    reference = {level: round(case.truth["bmd_mg_cm3"][level], 1) for level in LEVELS}
    for level, value in reference.items():
        setattr(params, f"qct{level}", value)
    folder = logic.exportTrainingPair()
    assert folder == tmp_path / "dataset" / "case01"

    image = sitk.ReadImage(str(folder / "annotation_image.nii.gz"))
    labels = sitk.ReadImage(str(folder / "annotation_labels.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), slicer.util.arrayFromVolume(image_node))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels)[0], drawn)
    assert labels.GetPixelID() == sitk.sitkUInt8
    affine = LPS_TO_RAS @ ijk_to_ras(image_node)
    np.testing.assert_allclose(image.GetOrigin(), affine[:3, 3], atol=1e-4)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), affine[:3, :3] / 0.8, atol=1e-6)
    meta = json.loads((folder / "annotation.json").read_text(encoding="utf-8"))
    assert meta["case"] == "case01" and meta["levels_drawn"] == list(LEVELS)
    assert meta["qct_reference_mg_cm3"] == reference and meta["label_values"]["3"] == "L3"
    assert meta["canal"]["sagittal_x_lps"] == pytest.approx(logic.labelGeometry(seg_node).sagittal_x_lps, abs=1e-3)
    ct = sitk.ReadImage(str(folder / "ct.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ct), case.ct.hu)

    # the training readers take it as it is
    dataset = tmp_path / "dataset"
    assert find_pairs(dataset) == [folder]
    pair = load_pair(folder)
    np.testing.assert_array_equal(pair.labels, drawn)
    assert find_bmd_cases(dataset) == [folder]
    assert case_reference(folder, read_reference(dataset)) == reference

    # a second export of the same id is refused unless overwriting is allowed; the files are unchanged
    with pytest.raises(LumbarBMDError, match="already exists"):
        logic.exportTrainingPair()
    params.overwriteCase = True
    params.qctL4 = 0.0  # L4's reference cleared
    logic.exportTrainingPair()
    with (dataset / "bmd_reference.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["level"] for r in rows] == ["L1", "L2", "L3"] and {r["case"] for r in rows} == {"case01"}


def test_export_refuses_bad_input_and_writes_nothing(logic, ct_node, case, tmp_path, monkeypatch):
    image_node, seg_node = logic.createAnnotationImage(ct_node)
    dataset = tmp_path / "dataset"
    params = logic.getParameterNode()
    with pytest.raises(LumbarBMDError, match="choose the dataset folder first"):
        logic.exportTrainingPair(caseId="c0")
    monkeypatch.chdir(tmp_path)  # "." (what ctkDirectoryButton returned when nothing was chosen) is refused
    for relative in (".", "dataset"):
        params.datasetFolder = relative
        with pytest.raises(LumbarBMDError, match="not a full path"):
            logic.exportTrainingPair(caseId="c0")
    assert list(tmp_path.iterdir()) == []  # nothing written into the working directory
    params.datasetFolder = str(dataset)
    with pytest.raises(LumbarBMDError, match="no vertebra is drawn"):
        logic.exportTrainingPair(caseId="empty")
    drawn = truth_on(image_node, case)
    slicer.util.updateSegmentBinaryLabelmapFromArray((drawn == 1).astype(np.uint8), seg_node, "L1", image_node)
    with pytest.raises(LumbarBMDError, match="cannot be a folder name"):
        logic.exportTrainingPair(caseId="../escape")
    with pytest.raises(LumbarBMDError, match="L2 has a QCT reference value but is not drawn"):
        logic.exportTrainingPair(caseId="c1", referenceBMD={"L2": 100.0})
    with pytest.raises(LumbarBMDError, match="a typing error"):
        logic.exportTrainingPair(caseId="c1", referenceBMD={"L1": 1000.0})
    assert not dataset.exists() or not any(dataset.iterdir())
    folder = logic.exportTrainingPair(caseId="c1", referenceBMD={})
    assert sorted(p.name for p in folder.iterdir()) == ["annotation.json", "annotation_image.nii.gz",
                                                        "annotation_labels.nii.gz"]


# --------------------------------------------------------------------------------------
# the parameter node and the scene survive saving and reloading
# --------------------------------------------------------------------------------------
def test_parameters_are_stored_as_slicers_parameter_node_wrapper_stores_them(logic, ct_node):
    params = logic.getParameterNode()
    node = params.parameterNode
    assert node.GetParameter("device") == "cpu" and node.GetParameter("overwriteCase") == "False"
    params.overwriteCase = True
    params.qctL2 = 95.5
    params.inputVolume = ct_node
    assert node.GetParameter("overwriteCase") == "True" and node.GetParameter("qctL2") == "95.5"
    assert node.GetNodeReferenceID("inputVolume") == ct_node.GetID() and node.HasParameter("inputVolume")
    again = type(params)(node)  # a new wrapper on the same node reads the same values
    assert again.qctL2 == 95.5 and again.overwriteCase is True and again.inputVolume.GetID() == ct_node.GetID()
    with pytest.raises(TypeError):
        params.segmentation = ct_node  # a volume is not a segmentation


def save_scene(scene, folder):
    """Write every volume, segmentation and table with its storage node, then the .mrml (as Slicer's Save does)."""
    folder.mkdir()
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if not any(node.IsA(c) for c in ("vtkMRMLVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLTableNode")):
            continue
        if node.GetStorageNode() is None:
            node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
        storage.SetFileName(str(folder / f"{node.GetID()}.{storage.GetDefaultWriteFileExtension()}"))
        assert storage.WriteData(node) == 1, node.GetName()
    scene.SetRootDirectory(str(folder))
    scene.SetURL(str(folder / "scene.mrml"))
    assert scene.Commit() == 1


def test_save_and_reload_the_scene_keeps_results_and_recompute_works(lumbarbmd_module, logic, ct_node, mrml,
                                                                      monkeypatch, tmp_path):
    nodes = logic.compute(ct_node)
    seg = nodes.segmentation
    array = slicer.util.arrayFromSegmentBinaryLabelmap(seg, "L2", ct_node)
    slicer.util.updateSegmentBinaryLabelmapFromArray(np.zeros_like(array), seg, "L2", ct_node)
    edited = logic.recompute()
    rows = logic.tableRows(edited.table)
    logic.createAnnotationImage(ct_node)
    logic.getParameterNode().qctL3 = 123.4
    assert nodes.table.GetStorageNode().GetDefaultWriteFileExtension() == "csv"
    save_scene(mrml.scene, tmp_path / "saved")

    env = new_mrml_env()
    use_scene(monkeypatch, env)
    env.scene.SetURL(str(tmp_path / "saved" / "scene.mrml"))
    assert env.scene.Connect() == 1
    reloaded = lumbarbmd_module.LumbarBMDLogic()  # a new logic: nothing cached
    params = reloaded.getParameterNode()
    assert params.qctL3 == 123.4 and params.device == "cpu"
    assert params.inputVolume.GetName() == "Phantom CT"
    assert params.table.GetAttribute("LumbarBMD.Status") == "partial"
    assert reloaded.tableRows(params.table) == rows  # NaN cells of L2 survive the CSV
    segmentation = params.segmentation.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(4)] == list(LEVELS)
    assert reloaded.labelGeometry(params.segmentation) == logic.labelGeometry(seg)
    assert params.annotationImage is not None and params.annotationSegmentation is not None
    # the reloaded segments measure to the same table
    again = reloaded.recompute()
    assert reloaded.tableRows(again.table) == rows


# --------------------------------------------------------------------------------------
# robustness: a failed import, a scene closed during a computation
# --------------------------------------------------------------------------------------
def test_a_failed_import_leaves_the_segmentation_responsive_to_modified_events(logic, mrml):
    """setLevelSegments fails half-way inside StartModify (here: no geometry reference node): EndModify still runs, so
    the segmentation keeps notifying its observers (the views, the Segment Editor), and it can be filled again."""
    from LumbarBMDLib.sagittal import SagittalGeometry

    geometry = SagittalGeometry(origin_lps=(0.0, 0.0, 0.0), n_slices=1, sagittal_x_lps=0.0, size=16)
    reference = slicer.util.addVolumeFromArray(np.zeros((1, 16, 16), np.int16), name="reference")
    seg = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "existing")
    labels = np.zeros((16, 16), np.uint8)
    labels[3:6, 3:6] = 2
    logic.setLevelSegments(seg, labels, geometry, reference)
    events = []
    seg.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: events.append(event))
    with pytest.raises(AttributeError):
        logic.setLevelSegments(seg, labels, geometry, None)
    events.clear()
    seg.Modified()
    seg.SetName("renamed")
    assert events == ["ModifiedEvent", "ModifiedEvent"]
    assert mrml.scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0  # the temporary is gone
    logic.setLevelSegments(seg, labels, geometry, reference)
    assert logic.levelSegmentIds(seg).keys() == set(LEVELS)
    assert logic.labelsFromSegmentation(seg, geometry)[4, 4] == 2


def test_a_result_is_not_applied_to_a_ct_removed_or_a_scene_closed_during_the_computation(lumbarbmd_module, logic,
                                                                                           ct_node, mrml, case):
    """The widget keeps processing events while the worker thread measures, so the user can close the scene (or
    delete the CT) meanwhile: the result is discarded and nothing is added to the scene."""
    volume = logic.ctVolumeForMeasurement(ct_node)
    measurement = logic.measureVolume(volume, logic.computeSettings())  # what the worker thread does
    mrml.scene.Clear(0)  # File > Close Scene
    with pytest.raises(lumbarbmd_module.ResultDiscarded, match=r"removed from the scene \(or the scene was closed\)"):
        logic.showResult(ct_node, measurement)
    for class_name in ("vtkMRMLSegmentationNode", "vtkMRMLTableNode", "vtkMRMLLabelMapVolumeNode"):
        assert mrml.scene.GetNodesByClass(class_name).GetNumberOfItems() == 0, class_name
    params = logic.getParameterNode()
    assert params.segmentation is None and params.table is None and params.inputVolume is None

    other = logic.ctVolumeToVolumeNode(case.ct, "Second CT")
    mrml.scene.RemoveNode(other)  # deleted in the Data module meanwhile
    with pytest.raises(lumbarbmd_module.ResultDiscarded, match="'Second CT' was removed"):
        logic.showResult(other, measurement)
    assert mrml.scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0

    # a CT still in the scene gets the result; closing the scene forgets what was kept for it
    kept = logic.ctVolumeToVolumeNode(case.ct, "Third CT")
    nodes = logic.showResult(kept, measurement)
    assert nodes.results["status"] == "ok" and logic._caseResults and logic._annotations
    mrml.scene.Clear(0)
    assert not logic._caseResults and not logic._annotations


# --------------------------------------------------------------------------------------
# export of the results from Slicer: the files `lumbarbmd run` writes
# --------------------------------------------------------------------------------------
class _HTMLChecker:
    """Parses a page with the standard library's HTML parser: tags must nest and close (void elements aside)."""

    VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
                      "wbr"})

    def __init__(self, text: str) -> None:
        from html.parser import HTMLParser

        self.stack, self.errors, self.text, self.doctype = [], [], [], False
        checker = self

        class Parser(HTMLParser):
            def handle_decl(self, decl):
                checker.doctype = checker.doctype or decl.lower() == "doctype html"

            def handle_starttag(self, tag, attrs):
                if tag not in checker.VOID:
                    checker.stack.append(tag)

            def handle_endtag(self, tag):
                if tag in checker.VOID:
                    return
                if not checker.stack or checker.stack[-1] != tag:
                    checker.errors.append(f"</{tag}> closes <{checker.stack[-1] if checker.stack else None}>")
                else:
                    checker.stack.pop()

            def handle_data(self, data):
                checker.text.append(data)

        parser = Parser()
        parser.feed(text)
        parser.close()
        self.text = " ".join(self.text)


def test_export_results_writes_what_lumbarbmd_run_writes_for_the_current_edited_result(logic, ct_node, mrml,
                                                                                       tmp_path):
    from LumbarBMDLib.batch import LEVEL_COLUMNS, SUMMARY_COLUMNS

    nodes = logic.compute(ct_node)
    array = slicer.util.arrayFromSegmentBinaryLabelmap(nodes.segmentation, "L2", ct_node)
    slicer.util.updateSegmentBinaryLabelmapFromArray(np.zeros_like(array), nodes.segmentation, "L2", ct_node)
    edited = logic.recompute()
    params = logic.getParameterNode()
    params.resultsFolder = str(tmp_path / "out")
    folder = logic.exportResults()
    assert folder == tmp_path / "out" / "Phantom_CT"
    # the per-case files of `lumbarbmd run` (DESIGN.md), in the same layout, plus the folder's summary.csv
    assert sorted(p.name for p in folder.iterdir()) == ["report.html", "results.csv", "results.json",
                                                        "sagittal.nii.gz", "sagittal_labels.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == [
        "Phantom_CT", "summary.csv"]

    exported = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    current = json.loads(edited.table.GetAttribute("LumbarBMD.Results"))
    assert exported == {**current, "case_id": "Phantom_CT"}  # the recomputed result, not the first one
    assert exported["status"] == "partial" and [v["found"] for v in exported["vertebrae"]] == [True, False, True, True]
    with (folder / "results.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == LEVEL_COLUMNS and [r["level"] for r in rows] == list(LEVELS)
    assert rows[1]["found"] == "False" and rows[1]["bmd_mg_cm3"] == ""
    table_bmd = table_column(edited.table, "BMD")
    for i in (0, 2, 3):
        assert float(rows[i]["bmd_mg_cm3"]) == pytest.approx(number(table_bmd[i]), abs=1e-6)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "sagittal_labels.nii.gz")))[0]
    np.testing.assert_array_equal(labels, logic.labelsFromSegmentation(edited.segmentation,
                                                                       logic.labelGeometry(edited.segmentation)))
    assert not (labels == 2).any()

    report = (folder / "report.html").read_text(encoding="utf-8")
    page = _HTMLChecker(report)
    assert page.doctype and not page.errors and page.stack == [], (page.errors, page.stack)
    for level in LEVELS:
        assert level in page.text
    with (tmp_path / "out" / "summary.csv").open(encoding="utf-8", newline="") as f:
        summary = list(csv.DictReader(f))
    assert list(summary[0]) == SUMMARY_COLUMNS
    assert [(r["case"], r["status"], r["L2"]) for r in summary] == [("Phantom_CT", "partial", "")]

    # painted back and recomputed: exporting again replaces the case folder with the new result
    slicer.util.updateSegmentBinaryLabelmapFromArray(array, edited.segmentation, "L2", ct_node)
    again = logic.recompute()
    assert logic.exportResults() == folder
    assert json.loads((folder / "results.json").read_text(encoding="utf-8"))["status"] == again.results["status"] \
        == "ok"


def test_export_results_refuses_without_a_chosen_folder_and_never_replaces_another_folder(
        lumbarbmd_module, logic, ct_node, mrml, tmp_path, monkeypatch):
    params = logic.getParameterNode()
    with pytest.raises(LumbarBMDError, match="no result to export"):
        logic.exportResults(str(tmp_path))
    logic.compute(ct_node)
    with pytest.raises(LumbarBMDError, match="choose the results folder first"):
        logic.exportResults()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    params.resultsFolder = "."
    with pytest.raises(LumbarBMDError, match="not a full path"):
        logic.exportResults()
    assert list(cwd.iterdir()) == []

    out = tmp_path / "out"
    (out / "Phantom_CT").mkdir(parents=True)
    (out / "Phantom_CT" / "notes.txt").write_text("the user's own file", encoding="utf-8")
    params.resultsFolder = str(out)
    with pytest.raises(LumbarBMDError, match="is not a Lumbar BMD result"):
        logic.exportResults()
    assert [p.name for p in (out / "Phantom_CT").iterdir()] == ["notes.txt"]
    (out / "Phantom_CT" / "notes.txt").unlink()
    (out / "Phantom_CT" / "results.json").write_text(json.dumps({"input": "another CT", "status": "ok"}),
                                                     encoding="utf-8")
    with pytest.raises(LumbarBMDError, match="holds the result of another CT"):
        logic.exportResults()
    assert json.loads((out / "Phantom_CT" / "results.json").read_text(encoding="utf-8"))["input"] == "another CT"

    # a logic that did not compute this result (e.g. after reloading the scene) has no images for the report
    other = lumbarbmd_module.LumbarBMDLogic()
    with pytest.raises(LumbarBMDError, match="press 'Recompute BMD', then export"):
        other.exportResults(str(tmp_path / "elsewhere"))
    other.recompute()
    assert (other.exportResults(str(tmp_path / "elsewhere")) / "report.html").is_file()


# --------------------------------------------------------------------------------------
# what the widget shows: refreshed when the table changes, buttons from the parameter node
# --------------------------------------------------------------------------------------
def test_the_results_table_is_refreshed_only_when_the_table_changes(lumbarbmd_module, logic, ct_node, mrml):
    """The widget's ResultNodesWatcher, driven as the widget drives it (on every Modified of the parameter node)."""
    params = logic.getParameterNode()
    shown, edited = [], []
    watcher = lumbarbmd_module.ResultNodesWatcher(shown.append, edited.append)
    params.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent,
                                     lambda caller, event: watcher.watch(params.table, params.segmentation))
    watcher.watch(params.table, params.segmentation)
    assert shown == [] and edited == []  # nothing watched yet, nothing to show

    nodes = logic.compute(ct_node)
    assert shown[-1] is nodes.table and nodes.table in shown
    count = len(shown)
    for text in ("c", "ca", "cas", "case"):  # typing the case id, choosing folders: the table is not redrawn
        params.caseId = text
    params.datasetFolder = "/data/lumbar"
    params.resultsFolder = "/data/results"
    params.qctL2 = 101.5
    assert len(shown) == count

    array = slicer.util.arrayFromSegmentBinaryLabelmap(nodes.segmentation, "L2", ct_node)
    slicer.util.updateSegmentBinaryLabelmapFromArray(np.zeros_like(array), nodes.segmentation, "L2", ct_node)
    assert edited[-1] is True  # the result is marked out of date
    logic.recompute()  # the table node is rewritten: shown again
    assert len(shown) > count and shown[-1] is nodes.table
    watcher.watch(None, None)
    assert shown[-1] is None and edited[-1] is False
    watcher.removeObservers()


def test_buttons_follow_the_parameter_node(lumbarbmd_module, logic, ct_node, mrml):
    states = lumbarbmd_module.LumbarBMDLogic.buttonStates
    assert not any(states(None).values())
    params = logic.getParameterNode()
    before = states(params)
    assert before["computeButton"] is False or params.inputVolume is not None
    params.inputVolume = ct_node
    assert states(params)["computeButton"] and not states(params)["exportResultsButton"]
    logic.compute(ct_node)
    now = states(params)
    assert now["exportResultsButton"] and now["recomputeButton"] and now["editSegmentsButton"]
    assert not any(states(params, busy=True).values())
    logic.createAnnotationImage(ct_node)
    params.caseId = ""
    assert not states(params)["exportTrainingPairButton"]
    params.caseId = "case01"
    assert states(params)["exportTrainingPairButton"]  # no folder yet: pressing it says to choose one


# --------------------------------------------------------------------------------------
# the self-test without its dependencies (a fresh Slicer, the extension build machines)
# --------------------------------------------------------------------------------------
def test_the_self_test_is_skipped_with_a_message_when_dependencies_are_missing(lumbarbmd_module, mrml):
    import unittest

    test = lumbarbmd_module.LumbarBMDTest()
    test.requirements = (*lumbarbmd_module.dependencies.RUNTIME_REQUIREMENTS, "no-such-package-lumbarbmd>=1")
    with pytest.raises(unittest.SkipTest, match="not installed: no-such-package-lumbarbmd>=1"):
        test.runTest()
    test.requirements = ("SimpleITK>=99",)  # a bundled package too old: never installed, the Slicer to get is named
    with pytest.raises(unittest.SkipTest, match=r"never replaced by the module: install 3D Slicer 5\.8 or later"):
        test.runTest()
    assert mrml.scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == 0  # skipped before any work
    result = unittest.TestResult()
    test.run(result)  # through unittest, as `slicer_add_python_unittest` runs it: a skip, not a failure
    assert len(result.skipped) == 1 and not result.failures and not result.errors
