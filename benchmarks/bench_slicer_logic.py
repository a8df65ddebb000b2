"""What a radiologist waits for in Slicer: the module's Logic on a real slicer-core MRML scene, full-size phantom CT.

Prints seconds for: volume node → checked CT (the MRML boundary), the pipeline, writing the segments/table/views
(``showResult``), ``recompute`` after an edit, ``createAnnotationImage`` and ``exportTrainingPair``.

    python benchmarks/bench_slicer_logic.py [--seed 2026] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing"))

import slicer  # noqa: E402
import slicer_fixtures  # noqa: E402

from LumbarBMDLib.phantom import generate_case  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    sys.modules["slicer.ScriptedLoadableModule"] = slicer_fixtures.make_scripted_loadable_module_stub()
    spec = importlib.util.spec_from_file_location("LumbarBMD", slicer_fixtures.MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["LumbarBMD"] = module
    spec.loader.exec_module(module)

    env = slicer_fixtures.new_mrml_env()
    slicer.mrmlScene = env.scene
    slicer.modules = type("Modules", (), {"segmentations": type("S", (), {"logic": staticmethod(
        lambda: env.segmentations)}), "volumes": type("V", (), {"logic": staticmethod(lambda: env.volumes)})})

    case = generate_case(args.seed, "A", "full")
    print(f"phantom seed {args.seed}: {' × '.join(map(str, case.ct.shape[::-1]))} voxels")
    logic = module.LumbarBMDLogic()
    logic.getParameterNode().device = "cpu"
    node = logic.ctVolumeToVolumeNode(case.ct, "CT")
    settings = logic.computeSettings()
    logic.loadModel("segmentation", "", "cpu")
    logic.loadModel("regression", "", "cpu")

    times: dict[str, list[float]] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append(time.perf_counter() - t)
        return out

    for _ in range(args.repeats):
        volume = timed("node → checked CT", lambda: logic.ctVolumeForMeasurement(node))
        measurement = timed("pipeline (measureVolume)", lambda v=volume: logic.measureVolume(v, settings))
        nodes = timed("segments + table + views (showResult)", lambda m=measurement: logic.showResult(node, m))
        seg = nodes.segmentation
        geometry = logic.labelGeometry(seg)
        # an edit on the segments' own sagittal grid (what the Segment Editor does) ...
        labels = logic.labelsFromSegmentation(seg, geometry)
        logic.setLevelSegments(seg, np.where(labels == 2, 0, labels), geometry, node)
        timed("recompute after erasing L2 (sagittal grid)", logic.recompute)
        # ... and one written on the CT's grid (e.g. a script with the CT as reference): Slicer resamples it
        logic.setLevelSegments(seg, labels, geometry, node)
        empty = np.zeros_like(slicer.util.arrayFromSegmentBinaryLabelmap(seg, "L2", node))
        slicer.util.updateSegmentBinaryLabelmapFromArray(empty, seg, "L2", node)
        timed("recompute after erasing L2 (CT grid)", logic.recompute)
        image, annotation = timed("create annotation image", lambda: logic.createAnnotationImage(node))
        drawn = logic.labelsFromSegmentation(seg, logic.labelGeometry(seg))
        logic.setLevelSegments(annotation, drawn, logic.labelGeometry(annotation), image)
        with tempfile.TemporaryDirectory() as tmp:
            timed("export training pair (with CT)", lambda t=tmp, i=image, a=annotation: logic.exportTrainingPair(
                t, "case", {"L1": 100.0}, imageNode=i, segmentationNode=a))
    for name, values in times.items():
        print(f"{name:44s} median {statistics.median(values):6.2f} s  (min {min(values):.2f}, n={len(values)})")


if __name__ == "__main__":
    main()
