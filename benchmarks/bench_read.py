"""Benchmark of ``read_ct`` against SimpleITK's own reader on a full-size CT (issue 13, item 7).

Usage:
    python benchmarks/bench_read.py [--repeats 5] [--slices 400] [--no-dicom] [--keep DIR]

Makes a full-size phantom CT (``generate_case(…, "full")``, 512 × 512, its slices repeated to ``--slices``) and
writes it as int16 ``.nii.gz`` with ``write_volume`` (the multi-member gzip this project writes), as a single-member
``.nii.gz`` written by SimpleITK, as the same in RAS orientation (as from dcm2niix/nibabel) and, unless ``--no-dicom``,
as a DICOM series (one file per slice). For each it times ``read_ct`` (every integrity and plausibility check
included) and SimpleITK's ``sitk.ReadImage`` (``ImageSeriesReader`` for DICOM) alternately, ``--repeats`` times,
and prints the medians and their ratio (target: read_ct / SimpleITK ≤ 1.5).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.volume import CTVolume, read_ct, write_volume


def make_volume(n_slices: int) -> CTVolume:
    """A full-size phantom CT (int16 HU) with its slices repeated to ``n_slices``."""
    case = generate_case(1000, "A", "full")
    hu = case.ct.hu
    reps = int(np.ceil(n_slices / hu.shape[0]))
    hu = np.concatenate([hu] * reps, axis=0)[:n_slices]
    return CTVolume(hu=np.ascontiguousarray(hu.astype(np.int16)), spacing=case.ct.spacing, origin=case.ct.origin)


def write_dicom(volume: CTVolume, folder: Path) -> None:
    """One DICOM file per axial slice (int16 HU, RescaleIntercept 0), positions along +S."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.8.498.99"
    for k in range(volume.shape[0]):
        img = sitk.GetImageFromArray(volume.hu[k])
        img.SetSpacing(volume.spacing[:2])
        position = np.asarray(volume.origin) + k * volume.spacing[2] * np.array([0.0, 0.0, 1.0])
        for key, value in {
            "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL", "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{uid}.{k + 1}", "0020|000d": f"{uid}.0", "0020|000e": uid, "0020|0011": "1",
            "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{v:.4f}" for v in position),
            "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": f"{volume.spacing[2]:g}", "0028|1052": "0",
            "0028|1053": "1",
        }.items():
            img.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{k:04d}.dcm"))
        writer.Execute(img)


def sitk_dicom(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def compare(name: str, ours: Callable[[], object], theirs: Callable[[], object], repeats: int) -> float:
    """Time both alternately (after one warm-up each, so the file is in the page cache); print and return the ratio."""
    ours()
    theirs()
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        theirs()
        t_theirs.append(time.perf_counter() - t)
        t = time.perf_counter()
        ours()
        t_ours.append(time.perf_counter() - t)
    a, b = statistics.median(t_ours), statistics.median(t_theirs)
    print(f"{name:34s} read_ct {a:6.3f} s   SimpleITK {b:6.3f} s   ratio {a / b:5.2f}")
    return a / b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=400)
    parser.add_argument("--no-dicom", action="store_true", help="skip the DICOM series (writing it takes a while)")
    parser.add_argument("--keep", type=Path, help="write the files here and keep them (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        volume = make_volume(args.slices)
        print(f"volume {volume.shape} int16, spacing {tuple(round(s, 3) for s in volume.spacing)} mm")
        files = {"nii.gz (write_volume, 2 members)": write_volume(volume, root / "ct.nii.gz", dtype=np.int16)}
        img = volume.to_sitk()
        sitk.WriteImage(img, str(root / "ct_sitk.nii.gz"), True)
        files["nii.gz (SimpleITK, 1 member)"] = root / "ct_sitk.nii.gz"
        ras = sitk.DICOMOrient(img, "RAS")  # same voxels and LPS points, index axes along R, A, S
        sitk.WriteImage(ras, str(root / "ct_ras.nii.gz"), True)
        files["nii.gz RAS (1 member)"] = root / "ct_ras.nii.gz"
        for name, path in files.items():
            compare(name, lambda p=path: read_ct(p), lambda p=path: sitk.ReadImage(str(p)), args.repeats)
        if not args.no_dicom:
            write_dicom(volume, root / "dicom")
            compare(f"DICOM ({args.slices} files)", lambda: read_ct(root / "dicom"),
                    lambda: sitk_dicom(root / "dicom"), args.repeats)


if __name__ == "__main__":
    main()
