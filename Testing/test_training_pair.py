"""Writing an annotator's training pair (the Slicer module's 'Export training pair'), at the library level."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk

from LumbarBMDLib.bmd_training import read_reference
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.seg_training import find_pairs, load_pair
from LumbarBMDLib.training_pair import update_reference_csv, write_training_pair


@pytest.fixture(scope="module")
def case():
    return generate_case(99_311, "A", "small")


@pytest.fixture
def pair(case):
    geometry = case.annotation_geometry
    return (geometry.to_sitk(case.annotation_image.astype(np.float32)),
            geometry.to_sitk(case.annotation_labels.astype(np.uint8)))


def test_a_pair_with_references_is_read_by_both_trainers(case, pair, tmp_path):
    image, labels = pair
    reference = {"L1": 101.0, "L3": 97.5}
    folder = write_training_pair(tmp_path, "p1", image, labels, "phantom", reference, case.ct)
    assert sorted(p.name for p in folder.iterdir()) == ["annotation.json", "annotation_image.nii.gz",
                                                        "annotation_labels.nii.gz", "ct.nii.gz"]
    assert find_pairs(tmp_path) == [folder]
    np.testing.assert_array_equal(load_pair(folder).labels, case.annotation_labels)
    assert read_reference(tmp_path) == {"p1": reference}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_reference_table_keeps_other_cases_and_replaces_this_one(tmp_path):
    update_reference_csv(tmp_path, "a", {"L1": 90.0, "L2": 91.0})
    update_reference_csv(tmp_path, "b", {"L4": 120.0})
    update_reference_csv(tmp_path, "a", {"L3": 95.0})
    with (tmp_path / "bmd_reference.csv").open(encoding="utf-8") as f:
        rows = [(r["case"], r["level"], r["bmd_mg_cm3"]) for r in csv.DictReader(f)]
    assert rows == [("b", "L4", "120"), ("a", "L3", "95")]
    (tmp_path / "bmd_reference.csv").write_text("patient,value\n1,2\n", encoding="utf-8")
    with pytest.raises(LumbarBMDError, match="not a reference table"):
        update_reference_csv(tmp_path, "a", {"L3": 95.0})


def test_bad_pairs_are_refused_before_anything_is_written(case, pair, tmp_path):
    image, labels = pair
    with pytest.raises(LumbarBMDError, match="need the CT"):
        write_training_pair(tmp_path, "p1", image, labels, reference_bmd={"L1": 100.0})
    shifted = sitk.Image(labels)
    shifted.SetOrigin(tuple(np.add(labels.GetOrigin(), (5.0, 0.0, 0.0))))
    with pytest.raises(LumbarBMDError, match="not on the annotation image's grid"):
        write_training_pair(tmp_path, "p1", image, shifted)
    small = sitk.Image([256, 256, 1], sitk.sitkFloat32)
    with pytest.raises(LumbarBMDError, match="not one 512 × 512 sagittal slice"):
        write_training_pair(tmp_path, "p1", small, small)
    bad = sitk.GetImageFromArray(np.full((1, 512, 512), 7, np.uint8))
    bad.CopyInformation(labels)
    with pytest.raises(LumbarBMDError, match="label values must be 0–4"):
        write_training_pair(tmp_path, "p1", image, bad)
    assert list(tmp_path.iterdir()) == []
    write_training_pair(tmp_path, "p1", image, labels)
    with pytest.raises(LumbarBMDError, match="already exists"):
        write_training_pair(tmp_path, "p1", image, labels)
