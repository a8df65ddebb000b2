"""The ``lumbarbmd`` command line (also ``python -m LumbarBMDLib``).

Every expected failure is a :class:`~LumbarBMDLib.errors.LumbarBMDError`: it is printed as one line
``lumbarbmd: error: ...`` on stderr and the exit status is 1 (2 for a wrong command line).

Start-up: this module and the parser import nothing heavy (no numpy, torch, MONAI, SciPy, SimpleITK or matplotlib:
``lumbarbmd --help`` is a fraction of a second); each command imports what it uses. A command run as the process
(``main()`` without arguments: the ``lumbarbmd`` script, ``python -m LumbarBMDLib``) ends with :func:`os._exit`
once its output is flushed, which spares the second of interpreter teardown that torch and MONAI's thousands of
modules cost (every file is closed by then; :func:`main` called with arguments, from Python, just returns).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from LumbarBMDLib import __version__
from LumbarBMDLib._compat import zip_strict
from LumbarBMDLib.errors import LumbarBMDError

DEMO_SEED = 2026  # the embedded default case of `lumbarbmd demo`
#: ``phantom --variant`` choices: :data:`LumbarBMDLib.phantom.VARIANTS`, written out so that building the parser
#: does not import the phantom (SciPy, SimpleITK); Testing/test_startup.py checks the two are equal.
PHANTOM_VARIANTS = ("none", "fracture", "implant", "partial-L1", "partial-L4", "six-lumbar", "contrast",
                    "contrast-arterial", "contrast-portal-venous", "contrast-delayed", "low-dose", "scoliosis",
                    "calcification", "mixed")


def cmd_phantom(args: argparse.Namespace) -> int:
    """Write a phantom cohort."""
    import numpy as np

    from LumbarBMDLib.phantom import generate_cohort

    if args.scanner:
        from LumbarBMDLib.phantom.physical_scanner import as_physics, scanner_vendor

        physics = as_physics(args.scanner)  # a bad file is a one-sentence ScannerSpecError
        csv_path = generate_cohort(args.out, cases=args.cases, seed=args.seed, size=args.size, variant=args.variant,
                                   progress=not args.quiet, scanner=physics)
        if args.calibration_scan:
            from LumbarBMDLib.phantom.calibration_scan import calibration_scan
            from LumbarBMDLib.phantom.physical_scanner import case_prefix, profile_from_physics
            from LumbarBMDLib.volume import write_volume

            path = write_volume(calibration_scan(profile_from_physics(physics)),
                                Path(args.out) / f"calibration_{case_prefix(physics)}.nii.gz", np.int16)
            print(f"calibration-phantom scan of scanner {scanner_vendor(physics)}: {path}")
        print(f"wrote {args.cases} case(s) on scanner {scanner_vendor(physics)} to {Path(args.out).resolve()} "
              f"(cohort table: {csv_path})")
        return 0
    vendors = ["A", "B", "C"] if args.vendor == "all" else [args.vendor]
    for vendor in vendors:
        csv_path = generate_cohort(args.out, cases=args.cases, seed=args.seed, vendor=vendor, size=args.size,
                                   variant=args.variant, progress=not args.quiet)
        if args.calibration_scan:
            from LumbarBMDLib.phantom.calibration_scan import calibration_scan
            from LumbarBMDLib.volume import write_volume

            path = write_volume(calibration_scan(vendor), Path(args.out) / f"calibration_{vendor}.nii.gz", np.int16)
            print(f"calibration-phantom scan of vendor {vendor}: {path}")
    print(f"wrote {args.cases * len(vendors)} case(s) to {Path(args.out).resolve()} (cohort table: {csv_path})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default: make a phantom CT, run the whole pipeline, print the table."""
    from LumbarBMDLib.batch import run_case
    from LumbarBMDLib.phantom import generate_case, write_case
    from LumbarBMDLib.regression import RegressionModel
    from LumbarBMDLib.segmentation import SegmentationModel

    case = generate_case(args.seed, "A", args.size, "none")
    out = Path(args.out)
    folder = write_case(case, out / "phantom")
    t = case.truth
    nz, ny, nx = case.ct.shape
    sx, sy, sz = case.ct.spacing
    print(f"LumbarBMD {__version__} demo: synthetic lumbar CT (phantom), vendor {t['vendor']}, seed {t['seed']}")
    print(f"CT: {nx} x {ny} x {nz} voxels, {sx:.2f} x {sy:.2f} x {sz:.2f} mm -> {folder / 'ct.nii.gz'}")
    seg = SegmentationModel.load(device=args.device, allow_unverified=args.allow_unverified_model)
    bmd = RegressionModel.load(device=args.device, allow_unverified=args.allow_unverified_model)
    results = run_case(folder / "ct.nii.gz", out / case.case_id, seg, bmd, None)
    if results["status"] == "failed":
        raise LumbarBMDError(results["error"])
    print()
    print("level  BMD mg/cm3  category      confidence   truth mg/cm3")
    for v in results["vertebrae"]:
        truth = t["bmd_mg_cm3"].get(v["level"])
        if v["found"]:
            print(f"{v['level']:<5}  {v['bmd_mg_cm3']:>10.1f}  {v['category']:<12}  {v['confidence']:>10.2f}   "
                  f"{truth:>12.1f}")
        else:
            print(f"{v['level']:<5}  {'-':>10}  {v.get('reason', '')}")
    print(f"mean   {results['mean_bmd_mg_cm3']:>10.1f}  {results['category']:<12}  {'':>10}   "
          f"{t['mean_bmd_mg_cm3']:>12.1f}")
    tm = results["timings_s"]
    print(f"\nstatus {results['status']}; time {tm['total']:.1f} s (load {tm['load']:.1f}, canal {tm['canal']:.1f}, "
          f"segment {tm['segment']:.1f}, regress {tm['regress']:.2f})")
    print(f"report:  {(out / case.case_id / 'report.html').resolve()}")
    print(f"results: {(out / case.case_id / 'results.json').resolve()}")
    return 0


#: ``run``'s PACS query options and the :class:`~LumbarBMDLib.pacs.query.StudyQuery` field each fills.
PACS_QUERY_OPTIONS = {"patient_id": "patient_id", "patient_name": "patient_name", "study_date": "study_date",
                      "accession": "accession_number", "study_uid": "study_instance_uid", "modality": "modality"}


def pacs_query(args: argparse.Namespace) -> dict:
    """The study query of ``run --pacs`` (empty options left out)."""
    return {key: getattr(args, opt) for opt, key in PACS_QUERY_OPTIONS.items() if getattr(args, opt)}


def check_run_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``run``: the Dask options only with --scheduler; something to measure; the PACS options only with --pacs."""
    for option, least, need in (("threads_per_worker", 1, "at least 1"), ("retries", 0, "zero or more")):
        value = getattr(args, option)
        if value is not None and value < least:
            parser.error(f"--{option.replace('_', '-')} must be {need}")
        if value is not None and not args.scheduler:
            parser.error(f"--{option.replace('_', '-')} needs --scheduler")
    if args.pacs is None:
        given = [f"--{opt.replace('_', '-')}" for opt in (*PACS_QUERY_OPTIONS, "pacs_cache", "pacs_refresh",
                                                          "send_back", "send_back_to")
                 if opt != "modality" and getattr(args, opt)]
        if given:
            parser.error(f"{', '.join(given)} need(s) --pacs ADDRESS (the PACS to query)")
        if not args.inputs:
            parser.error("run needs INPUT files or DICOM folders, or --pacs ADDRESS with a query")
    elif not any(getattr(args, opt) for opt in PACS_QUERY_OPTIONS if opt != "modality"):
        parser.error("--pacs needs a query besides the modality (--patient-id, --patient-name, --study-date, "
                     "--accession or --study-uid): a PACS is never asked for all of its studies")


def cmd_run(args: argparse.Namespace) -> int:
    """The whole method over CT files and DICOM folders (here, or on Dask workers with ``--scheduler``), or over the
    studies a PACS query finds (``--pacs``)."""
    if args.scheduler:
        from LumbarBMDLib.distributed import check_scheduler, import_distributed

        check_scheduler(args.scheduler)
        import_distributed()  # not installed: the sentence now, before any work
    from LumbarBMDLib.batch import run_batch
    from LumbarBMDLib.calibration import read_calibration

    calibration = read_calibration(args.calibration) if args.calibration else None
    spec = None
    if args.scanner_spec:
        from LumbarBMDLib.phantom.physics import read_scanner_json

        spec = read_scanner_json(args.scanner_spec)  # a bad file is one sentence
    inputs, extras, names, failed_studies = list(args.inputs), {}, {}, []
    if args.pacs:
        from LumbarBMDLib.pacs.screening import DEFAULT_CACHE, study_inputs

        found = study_inputs(args.pacs, pacs_query(args), args.pacs_cache or Path(args.out) / DEFAULT_CACHE,
                             refresh=args.pacs_refresh)
        inputs += [str(p) for p in found.inputs]
        extras, names, failed_studies = found.extras, found.names, found.failed
    outcomes = []
    if failed_studies:
        from LumbarBMDLib.durable import check_writable_folder
        from LumbarBMDLib.pacs.screening import record_failed_studies

        outcomes += record_failed_studies(check_writable_folder(args.out), failed_studies)
    if inputs:
        outcomes += run_batch(inputs, args.out, device=args.device, force=args.force, calibration=calibration,
                              seg_model_path=args.seg_model, bmd_model_path=args.bmd_model, progress=not args.quiet,
                              allow_unverified=args.allow_unverified_model, scanner_spec=spec,
                              scheduler=args.scheduler, threads_per_worker=args.threads_per_worker,
                              retries=args.retries, dicom_out=args.dicom or args.send_back, extras=extras,
                              names=names)
    if failed_studies and not inputs:  # a batch writes summary.csv (failed studies' folders included)
        from LumbarBMDLib.batch import write_summary

        write_summary(Path(args.out))
    sent = []
    if args.send_back:
        from LumbarBMDLib.pacs.screening import send_case_outputs

        sent = send_case_outputs(args.out, outcomes, args.send_back_to or args.pacs)
    counts = {s: sum(o.results.get("status") == s for o in outcomes) for s in ("ok", "partial", "failed")}
    skipped = sum(o.skipped for o in outcomes)
    for o in outcomes:
        r = o.results
        if o.note:
            print(f"note: {o.note}")
        if r["status"] == "failed":
            print(f"{o.case}: failed: {r['error']}")
        else:
            missing = [v["level"] for v in r["vertebrae"] if not v["found"]]
            extra = f", missing {' '.join(missing)}" if missing else ""
            print(f"{o.case}: {r['status']}, mean BMD {r['mean_bmd_mg_cm3']:.1f} mg/cm³ ({r['category']}){extra}"
                  + (" [already done]" if o.skipped else ""))
    for line in sent:
        print(line)
    print(f"{len(outcomes)} case(s): {counts['ok']} ok, {counts['partial']} partial, {counts['failed']} failed"
          + (f" ({skipped} already done, skipped)" if skipped else "") + f"; summary: {Path(args.out) / 'summary.csv'}")
    return 1 if counts["failed"] else 0


#: ``info`` reads its HU percentiles on a random sample of at most this many voxels: exact percentiles of a full CT
#: (8·10⁷ voxels) took 1.3–2.4 s, longer than reading the file; 4·10⁶ voxels give each percentile to within 0.01
#: percentile points (3 HU at the full phantom's 99th, in the sparse tail between soft tissue and bone; 0.21 s).
INFO_PERCENTILE_SAMPLE = 4_000_000


def hu_percentiles(hu, q: Sequence[float], sample: int = INFO_PERCENTILE_SAMPLE) -> list[float]:
    """Percentiles ``q`` of the HU array, on ``sample`` voxels drawn at random (seeded; all voxels when fewer)."""
    import numpy as np

    flat = hu.reshape(-1)
    if flat.size > sample:  # a seeded random sample: a regular stride aliases with the rows (18 HU off at p99)
        flat = flat[np.random.default_rng(0).integers(0, flat.size, sample)]
    return [round(float(v), 1) for v in np.percentile(flat, list(q))]


def cmd_info(args: argparse.Namespace) -> int:
    """Read a CT (file or DICOM folder) and describe it."""
    import numpy as np

    from LumbarBMDLib.volume import read_ct

    vol = read_ct(args.input)
    nz, ny, nx = vol.shape
    info = {
        "input": str(args.input),
        "size_xyz": [nx, ny, nz],
        "spacing_mm": [round(s, 4) for s in vol.spacing],
        "origin_lps": [round(o, 3) for o in vol.origin],
        "orientation_in_file": vol.metadata.get("original_orientation"),
        "hu_range": [float(np.min(vol.hu)), float(np.max(vol.hu))],
        "hu_percentiles_1_50_99": hu_percentiles(vol.hu, (1, 50, 99)),
    }
    for key in ("format", "modality", "series_description", "dicom_choice", "warnings"):
        if vol.metadata.get(key):
            info[key] = vol.metadata[key]
    print(json.dumps(info, indent=1))
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    """Canal detection and the annotator's sagittal images of a CT."""
    from LumbarBMDLib.annotation import annotate

    ann = annotate(args.input, args.out)
    c = ann.canal
    out = Path(args.out).resolve()
    print(f"canal found on {len(c.slice_indices)} axial slices "
          f"(slices {int(c.slice_indices.min())}-{int(c.slice_indices.max())}), sagittal plane x = "
          f"{ann.images.annotation_geometry.sagittal_x_lps:.1f} mm (LPS), lateral drift {c.drift_mm:.1f} mm")
    if c.drift_mm > 10.0:
        print(f"note: the canal drifts {c.drift_mm:.0f} mm sideways (scoliosis?); one sagittal plane cuts the "
              "vertebrae off-centre at the ends: check the annotation image")
    spine = ann.spine
    if spine is not None and spine.numbered:
        named = [n for n in spine.names if n]
        print(f"vertebrae identified on the CT ({spine.anchor}): {', '.join(named)}")
        for flag in spine.flags:
            print(f"note: {flag.message}")
    elif spine is not None:
        print(f"vertebrae not numbered: {spine.refusal}")
    for warning in ann.volume.metadata.get("warnings", []):
        print(f"warning: {warning}")
    if ann.volume.metadata.get("dicom_choice"):
        print(ann.volume.metadata["dicom_choice"])
    print(f"wrote {out / 'annotation_image.nii.gz'}, candidates.nii.gz, canal.json, annotation_preview.png")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    """Canal, sagittal candidates and L1–L4 segmentation of a CT."""
    from LumbarBMDLib.annotation import prepare
    from LumbarBMDLib.segmentation import SegmentationModel, segment, segmentation_json, write_segmentation
    from LumbarBMDLib.spine.labelling import anatomical_labels, as_segmentation_result
    from LumbarBMDLib.volume import read_ct

    model = SegmentationModel.load(args.model, device=args.device, allow_unverified=args.allow_unverified_model)
    ann = prepare(read_ct(args.input))
    network = segment(model, ann.images, ann.canal.mean_centre_lps)
    anatomical = anatomical_labels(network.probabilities, network.geometry, ann.spine, ann.images.annotation_hu)
    result = as_segmentation_result(anatomical, network.probabilities)
    summary = segmentation_json(result, model, ann.canal_json())
    summary["network_levels"] = segmentation_json(network, model)["vertebrae"]  # the network's own numbering
    summary["dropped_segments"] = anatomical.dropped
    write_segmentation(args.out, ann.images, result, summary)
    spine = ann.spine
    print("levels numbered on the CT from " + spine.anchor if spine.numbered else f"not numbered: {spine.refusal}")
    for lv, an in zip_strict(result.levels, anatomical.levels):
        where = ", ".join(f"{c:.1f}" for c in lv.centre_lps) if lv.found else lv.reason
        said = f"; the network had labelled it {an.network_level}" if an.network_level not in (None, lv.level) else ""
        print(f"{lv.level}: " + (f"found ({an.source}{said}), centre LPS ({where})" if lv.found else where))
    for sentence in anatomical.dropped:
        print(f"note: {sentence}")
    print(f"status: {result.status}; wrote {Path(args.out).resolve()}/sagittal.nii.gz, sagittal_labels.nii.gz, "
          "segmentation.json, segmentation_preview.png")
    return 0


def cmd_train_seg(args: argparse.Namespace) -> int:
    """Train the L1–L4 R2U-Net on annotator pairs."""
    from LumbarBMDLib.seg_training import SegTrainingConfig, train_segmentation

    config = SegTrainingConfig(width=args.width, epochs=args.epochs, batch_size=args.batch_size,
                               learning_rate=args.lr, crop=args.crop, crop_rows=args.crop_rows,
                               crops_per_case=args.crops_per_case, val_fraction=args.val_fraction,
                               seed=args.seed, device=args.device, init=args.init or "",
                               randomise_prob=args.randomise)
    card = train_segmentation(args.data, args.out, config, resume=args.resume, progress=not args.quiet)
    dsc = card["metrics"]["validation_dsc"]
    print("best validation DSC: " + ", ".join(f"{k} {v:.3f}" for k, v in dsc.items()))
    print(f"model: {Path(args.out).resolve() / card['weights_file']} (sha256 {card['sha256'][:16]}...)")
    return 0


def cmd_train_bmd(args: argparse.Namespace) -> int:
    """Train the DenseNet-121 BMD regression on CTs + labels + reference BMD."""
    from LumbarBMDLib.bmd_training import BMDTrainingConfig, train_bmd

    config = BMDTrainingConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                               jitter=args.jitter, val_fraction=args.val_fraction, seed=args.seed, device=args.device)
    card = train_bmd(args.data, args.out, config, resume=args.resume, progress=not args.quiet,
                     reference_calibration=args.reference_calibration)
    m = card["metrics"]
    print(f"best validation RMSE {m['validation_rmse_mg_cm3']:.2f} mg/cm³ (bias {m['validation_bias_mg_cm3']:+.2f}) "
          f"at epoch {card['training']['best_epoch']}")
    print(f"model: {Path(args.out).resolve() / 'regression.safetensors'} (sha256 {card['sha256'][:16]}...)")
    return 0


def cmd_refit_bmd_head(args: argparse.Namespace) -> int:
    """Re-fit the BMD model's output layer to a new cohort (the DenseNet backbone kept)."""
    from LumbarBMDLib.bmd_training import BMDTrainingConfig, refit_bmd_head

    config = BMDTrainingConfig(jitter=args.jitter, val_fraction=args.val_fraction, seed=args.seed, device=args.device)
    card = refit_bmd_head(args.data, args.out, args.init, args.calibration, config, progress=not args.quiet)
    m = card["metrics"]
    print(f"validation RMSE {m['validation_rmse_mg_cm3']:.2f} mg/cm³ (bias {m['validation_bias_mg_cm3']:+.2f}); the "
          f"initial head: {m['initial_head_validation_rmse_mg_cm3']:.2f} "
          f"(bias {m['initial_head_validation_bias_mg_cm3']:+.2f})")
    print(f"model: {Path(args.out).resolve() / 'regression.safetensors'} (sha256 {card['sha256'][:16]}...)")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Fit a scanner's mineral calibration from a scan of the K2HPO4 calibration phantom."""
    from LumbarBMDLib.calibration import fit_calibration, write_calibration
    from LumbarBMDLib.volume import read_ct

    cal = fit_calibration(read_ct(args.scan))
    for conc, mean, sd in cal.rods:
        print(f"rod {conc:5.0f} mg/cm3: {mean:7.1f} HU (SD {sd:.1f})")
    print(f"calibration: HU = {cal.slope:.4f} x BMD {cal.intercept:+.2f} (r2 {cal.r2:.5f})")
    print(f"wrote {write_calibration(cal, args.out).resolve()}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """The paper's statistics of a results folder against its reference."""
    from LumbarBMDLib.evaluation import evaluate_folder

    res = evaluate_folder(args.results, args.truth, args.out)
    print(format_evaluation(res))
    print(f"wrote {Path(args.out).resolve()}/evaluation.json, bland_altman.png, scatter.png, confusion_matrix.png")
    return 0


def format_evaluation(res: dict) -> str:
    """A few lines summarising an evaluation.json object."""
    al, pt = res["all_levels"], res["patients"]
    ba = al["bland_altman"]
    lines = [f"levels: n {al['pearson']['n']}, Pearson r {al['pearson']['r']:.4f}, bias {ba['bias']:+.2f} mg/cm³, "
             f"limits of agreement {ba['loa'][0]:+.2f} .. {ba['loa'][1]:+.2f}, Wilcoxon p {al['wilcoxon']['p']:.3g}"]
    for level, m in res["levels"].items():
        r2 = m["r2"]
        lines.append(f"  {level}: r2 {r2['r2']:.4f} (95 % CI {r2['ci'][0]:.4f}-{r2['ci'][1]:.4f}), "
                     f"bias {m['bland_altman']['bias']:+.2f}")
    cat = pt["categories"]
    lines.append(f"patients: n {pt['n']}, kappa {cat['kappa']:.3f}, accuracy {cat['accuracy']:.3f}, "
                 f"confusion (rows reference, columns predicted: {', '.join(cat['labels'])}) {cat['confusion']}")
    cal = (res.get("cases") or {}).get("calibration")
    if cal:
        sources = ", ".join(f"{k} {v}" for k, v in cal["sources"].items())
        phases = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in cal["contrast_phases"].items()) or "not read"
        line = f"calibration: {sources}; contrast phase: {phases}; contrast-corrected {cal['contrast_corrected']}"
        e, k = cal.get("internal_effective_energy_kev"), cal.get("internal_k2hpo4_slope")
        if e and k:
            line += (f"; internal fits {e['mean']:.1f} ± {e['sd']:.1f} keV, K2HPO4 {k['mean']:.3f} ± {k['sd']:.3f} "
                     "HU per mg/cm³")
        lines.append(line)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands."""
    parser = argparse.ArgumentParser(prog="lumbarbmd", description="Lumbar bone mineral density from routine CT.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the main job on the embedded default case (a phantom CT)")
    p.add_argument("--out", default="lumbarbmd-demo", help="output folder (default: ./lumbarbmd-demo)")
    p.add_argument("--size", choices=["full", "small"], default="full", help="phantom size (default: full)")
    p.add_argument("--seed", type=int, default=DEMO_SEED, help=argparse.SUPPRESS)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--allow-unverified-model", action="store_true",
                   help="accept a model whose card has no sha256 (recorded as models_verified: false)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="the whole method on CT files and DICOM folders (batch)")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="NIfTI / NRRD / MHA file or DICOM folder (or none, "
                   "with --pacs)")
    p.add_argument("--out", required=True, help="output folder: OUT/<case>/results.json, ..., OUT/summary.csv")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--calibration", help="scanner calibration JSON (lumbarbmd calibrate) for these scans")
    p.add_argument("--scanner-spec", metavar="FILE.json", help="the site's scanner description (JSON as in "
                   "docs/scanner_example.json: kvp, filtration_mm_al, filtration_mm_cu): narrows the internal "
                   "calibration's energy prior; its kvp is used only for images without one (NIfTI)")
    p.add_argument("--force", action="store_true", help="run again cases already finished")
    p.add_argument("--seg-model", help="segmentation .safetensors (default: the shipped model)")
    p.add_argument("--bmd-model", help="regression .safetensors (default: the shipped model)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--allow-unverified-model", action="store_true",
                   help="accept a model whose card has no sha256 (recorded as models_verified: false)")
    p.add_argument("--max-voxels", type=int, metavar="N",
                   help="refuse volumes with more voxels than this (default: $LUMBARBMD_MAX_VOXELS or 2**30, about "
                        "4 GiB as float32)")
    p.add_argument("--scheduler", metavar="local[:N] | tcp://HOST:PORT",
                   help="run the cases on Dask (needs the archive extra): local = a cluster of worker processes on "
                        "this machine (N workers, default one per core within 3 GiB each), or the address of a "
                        "running Dask scheduler; without it the batch runs in this process")
    p.add_argument("--threads-per-worker", type=int, metavar="T",
                   help="with --scheduler: torch/ITK threads of each worker (default: the cores / the workers, so "
                        "they never oversubscribe the machine)")
    p.add_argument("--retries", type=int, metavar="R",
                   help="with --scheduler: times a case whose task raised is tried again (default 2; a case whose "
                        "worker died is re-run by the scheduler up to distributed.scheduler.allowed-failures)")
    p.add_argument("--dicom", action="store_true",
                   help="also write a DICOM SEG (L1-L4 bodies, trabecular ROIs) and a TID 1500 SR (BMD per level) "
                        "in the source study, OUT/<case>/seg.dcm and sr.dcm, for DICOM inputs (archive extra)")
    pacs = p.add_argument_group("studies from a PACS (archive extra; README 'Studies from a PACS')")
    pacs.add_argument("--pacs", metavar="ADDRESS", help="DICOMweb URL (http(s)://host/dicom-web) or "
                      "dimse://AET@host:port[?aet=LUMBARBMD&retrieve=get|move&store_port=N]: measure the studies "
                      "the query options find (one chosen series each)")
    pacs.add_argument("--patient-id", metavar="ID")
    pacs.add_argument("--patient-name", metavar="NAME", help="wildcards * and ?, ^ between name parts")
    pacs.add_argument("--study-date", metavar="RANGE", help="YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD")
    pacs.add_argument("--accession", metavar="NUMBER")
    pacs.add_argument("--study-uid", metavar="UID")
    pacs.add_argument("--modality", default="CT", help="ModalitiesInStudy (default CT)")
    pacs.add_argument("--pacs-cache", metavar="DIR", help="download cache (default OUT/.pacs-cache); complete "
                      "studies are not downloaded again")
    pacs.add_argument("--pacs-refresh", action="store_true", help="download the studies again even when complete")
    pacs.add_argument("--send-back", action="store_true",
                      help="send each measured case's SEG and SR to the PACS, into its study (implies --dicom)")
    pacs.add_argument("--send-back-to", metavar="ADDRESS", help="send them to this archive instead of --pacs")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("phantom", help="write synthetic lumbar CTs with exact ground truth")
    p.add_argument("out", help="output folder: OUT/<case>/ct.nii.gz, vertebrae.nii.gz, truth.json, OUT/cohort.csv")
    p.add_argument("--cases", type=int, default=1, help="number of cases (seeds SEED … SEED+N−1)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--vendor", choices=["A", "B", "C", "all"], default="A", help="scanner profile (default A)")
    which.add_argument("--scanner", metavar="FILE.json",
                       help="a physically defined scanner instead of a vendor (JSON as in docs/scanner_example.json; "
                            "needs the phantom-physics extra)")
    p.add_argument("--size", choices=["full", "small"], default="full", help="full: 512², 1 mm; small: 192², 2.5 mm")
    p.add_argument("--variant", choices=PHANTOM_VARIANTS, default="none",
                   help="anatomy/acquisition variant (default none); contrast = contrast-portal-venous, also "
                        "contrast-arterial, contrast-delayed")
    p.add_argument("--calibration-scan", action="store_true",
                   help="also write OUT/calibration_<vendor>.nii.gz: the scan of the K2HPO4 calibration phantom")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("annotate", help="find the canal and write the 20-slice mean sagittal image for annotators")
    p.add_argument("input", help="NIfTI / NRRD / MHA file or DICOM folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-voxels", type=int, metavar="N",
                   help="refuse volumes with more voxels than this (default: $LUMBARBMD_MAX_VOXELS or 2**30, about "
                        "4 GiB as float32)")
    p.set_defaults(func=cmd_annotate)

    p = sub.add_parser("segment", help="segment L1-L4 on the sagittal candidates of a CT (R2U-Net)")
    p.add_argument("input", help="NIfTI / NRRD / MHA file or DICOM folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default=None, help="segmentation .safetensors (default: the shipped model)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--allow-unverified-model", action="store_true",
                   help="accept a model whose card has no sha256 (recorded as models_verified: false)")
    p.add_argument("--max-voxels", type=int, metavar="N",
                   help="refuse volumes with more voxels than this (default: $LUMBARBMD_MAX_VOXELS or 2**30, about "
                        "4 GiB as float32)")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("train-seg", help="train the L1-L4 R2U-Net on annotation image/label pairs")
    p.add_argument("data", help="folder of case folders with annotation_image.nii.gz + annotation_labels.nii.gz")
    p.add_argument("--out", required=True, help="output folder (checkpoints, log, segmentation.safetensors + .json)")
    p.add_argument("--width", type=int, default=16, help="R2U-Net base width (features w..16w; default 16)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--crop", type=int, default=256, help="training crop width in pixels (multiple of 16)")
    p.add_argument("--crop-rows", type=int, default=384, help="training crop height in pixels (multiple of 16)")
    p.add_argument("--crops-per-case", type=int, default=4, help="random crops per training case and epoch")
    p.add_argument("--randomise", type=float, default=0.0, metavar="P",
                   help="probability of each domain randomisation (contrast-filled vessels and heart, bowel gas, "
                        "enhancing soft tissue, kernel, intensity field) per crop; 0 = off")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint_last.safetensors")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--init", help="start from this model's weights (fine-tuning on new annotations)")
    p.set_defaults(func=cmd_train_seg)

    p = sub.add_parser("train-bmd", help="train the DenseNet-121 BMD regression on CTs, L1-L4 labels and QCT values")
    p.add_argument("data", help="folder of case folders (ct.nii.gz + annotation_labels.nii.gz or vertebrae.nii.gz) "
                   "with bmd_reference.csv (case,level,bmd_mg_cm3) or truth.json per case")
    p.add_argument("--out", required=True, help="output folder (checkpoints, log, regression.safetensors + .json)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--jitter", type=int, default=8, help="patches per level around jittered centres (default 8)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--reference-calibration", help="calibration JSON of the training scanner (lumbarbmd calibrate), "
                   "stored in the model card so other scanners can be mapped onto it")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint_last.safetensors")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train_bmd)

    p = sub.add_parser("refit-bmd-head", help="re-fit the BMD model's output layer to a new cohort (ridge on the "
                       "frozen DenseNet-121 features)")
    p.add_argument("data", help="case folders as for train-bmd")
    p.add_argument("--out", required=True, help="output folder (regression.safetensors + .json)")
    p.add_argument("--init", help="the model whose backbone is kept (default: the shipped model)")
    p.add_argument("--calibration", help="calibration JSON (lumbarbmd calibrate) of DATA's scanner: its HU are mapped "
                   "onto the initial model's reference scale first, as at inference")
    p.add_argument("--jitter", type=int, default=8, help="patches per level around jittered centres (default 8)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_refit_bmd_head)

    p = sub.add_parser("calibrate", help="fit a scanner's BMD calibration from a K2HPO4 calibration-phantom scan")
    p.add_argument("scan", help="CT of the calibration phantom (file or DICOM folder)")
    p.add_argument("--out", required=True, help="calibration JSON to write (for run/evaluate --calibration)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("evaluate", help="the paper's statistics of a results folder against the reference, with plots")
    p.add_argument("results", help="folder with <case>/results.json (the output of a run)")
    p.add_argument("truth", help="reference: phantom cohort folder (truth.json per case) or CSV case,level,bmd_mg_cm3")
    p.add_argument("--out", required=True, help="output folder: evaluation.json and PNG plots")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("info", help="read a CT file or DICOM folder and describe it")
    p.add_argument("input", help="NIfTI / NRRD / MHA file or DICOM folder")
    p.add_argument("--max-voxels", type=int, metavar="N",
                   help="refuse volumes with more voxels than this (default: $LUMBARBMD_MAX_VOXELS or 2**30, about "
                        "4 GiB as float32)")
    p.set_defaults(func=cmd_info)
    return parser


OUTPUT_FOLDERS = ("demo", "run", "phantom", "annotate", "segment", "train-seg", "train-bmd", "evaluate")
OUTPUT_FILES = ("calibrate",)


def check_outputs(args: argparse.Namespace) -> None:
    """Before any work: the output folder (or file) of the command can be written, so that a computed result is
    never lost to a read-only, full or mistyped ``--out``."""
    from LumbarBMDLib.durable import check_writable_folder

    out = getattr(args, "out", None)
    if not out:
        return
    if args.command in OUTPUT_FOLDERS:
        check_writable_folder(out)
    elif args.command in OUTPUT_FILES:
        path = Path(out).expanduser()
        if path.is_dir():
            raise LumbarBMDError(f"--out {path} is a folder; give the file to write (e.g. {path / 'scanner.json'})")
        check_writable_folder(path.parent if str(path.parent) else Path("."), "folder of --out")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns the exit status (``argv`` None: the process's own command line, and the process ends
    here, see the module docstring)."""
    status = _main(argv)
    if argv is None:
        _fast_exit(status)
    return status


def _fast_exit(status: int) -> None:
    """End the process now with ``status``: streams flushed, logging shut down, no interpreter teardown."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(status)


def _main(argv: Sequence[str] | None) -> int:
    for stream in (sys.stdout, sys.stderr):  # an ASCII terminal must not crash on a "–" or "³" in a message
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "cases", 1) < 1:
        parser.error("--cases must be at least 1")
    if getattr(args, "func", None) is cmd_run:
        check_run_options(parser, args)
    if getattr(args, "max_voxels", None) is not None:
        if args.max_voxels < 1:
            parser.error("--max-voxels must be a positive number of voxels")
        os.environ["LUMBARBMD_MAX_VOXELS"] = str(args.max_voxels)  # read by volume.read_ct for every input
    try:
        check_outputs(args)
        return int(args.func(args))
    except LumbarBMDError as err:
        print(f"lumbarbmd: error: {err}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError, OSError) as err:
        from LumbarBMDLib.batch import failure_sentence

        sentence = failure_sentence(err, Path(getattr(args, "out", "") or "."))
        if sentence is None:
            raise
        print(f"lumbarbmd: error: {sentence}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lumbarbmd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
