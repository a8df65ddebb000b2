"""The paper's statistics (DESIGN.md "Method" 8), computed with scipy.stats and scikit-learn.

BMD agreement (predicted vs QCT reference, mg/cm³):

* **r² per vertebra** with a 95 % confidence interval: the square of the Pearson r and of the bounds of its
  Fisher-z confidence interval (``scipy.stats.pearsonr(...).confidence_interval``; bounds clipped at r = 0);
* **Pearson r** (with p) over all measured levels and over patients (mean of their levels);
* **Bland–Altman**: bias = mean(predicted − reference), SD of the differences, limits of agreement
  bias ± 1.96 SD, the bias's 95 % CI and a one-sample t-test of bias = 0;
* **Wilcoxon signed-rank** test of predicted vs reference (``scipy.stats.wilcoxon``);
* **Cohen's kappa** of the patients' categories (osteoporosis / osteopenia / normal;
  ``sklearn.metrics.cohen_kappa_score``, unweighted as in the paper) and the **3 × 3 confusion matrix**
  (rows reference, columns predicted);
* **cohort characteristics**: chi-square test of independence (``scipy.stats.chi2_contingency``) for
  categorical characteristics (sex, category, vendor, …) across cohorts; Kruskal–Wallis for continuous
  ones (age, BMD), which a chi-square does not apply to.

Segmentation: DSC / PPV / sensitivity per vertebra and the valid rate (:mod:`LumbarBMDLib.metrics`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from LumbarBMDLib._compat import zip_strict
from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.regression import CATEGORIES, bmd_category

LEVEL_NAMES = ("L1", "L2", "L3", "L4")


@dataclass
class Pairs:
    """Paired BMD values: ``case`` / ``level`` per pair, ``predicted`` and ``reference`` (mg/cm³)."""

    case: list[str]
    level: list[str]
    predicted: np.ndarray
    reference: np.ndarray


def r2_with_ci(predicted: np.ndarray, reference: np.ndarray, confidence: float = 0.95) -> dict:
    """r² = Pearson r² with the squared Fisher-z CI of r (n ≥ 4 for a CI)."""
    predicted, reference = np.asarray(predicted, float), np.asarray(reference, float)
    if predicted.size < 3:
        return {"n": int(predicted.size), "r2": float("nan"), "ci": [float("nan"), float("nan")]}
    res = stats.pearsonr(predicted, reference)
    if predicted.size >= 4:
        ci = res.confidence_interval(confidence)
        lo, hi = max(float(ci.low), 0.0), max(float(ci.high), 0.0)
    else:
        lo = hi = float("nan")
    return {"n": int(predicted.size), "r2": float(res.statistic) ** 2, "ci": [lo**2, hi**2]}


def pearson(predicted: np.ndarray, reference: np.ndarray) -> dict:
    """Pearson r and its two-sided p."""
    if len(predicted) < 3:
        return {"n": len(predicted), "r": float("nan"), "p": float("nan")}
    res = stats.pearsonr(predicted, reference)
    return {"n": len(predicted), "r": float(res.statistic), "p": float(res.pvalue)}


def bland_altman(predicted: np.ndarray, reference: np.ndarray) -> dict:
    """Bias, SD, 95 % limits of agreement, the bias's 95 % CI and a t-test of bias = 0 (mg/cm³)."""
    d = np.asarray(predicted, float) - np.asarray(reference, float)
    n = d.size
    if n < 2:
        raise LumbarBMDError("Bland–Altman needs at least two pairs")
    bias, sd = float(d.mean()), float(d.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n))
    t = stats.ttest_1samp(d, 0.0)
    return {"n": n, "bias": bias, "sd": sd, "loa": [bias - 1.96 * sd, bias + 1.96 * sd],
            "bias_ci": [bias - half, bias + half], "t_test_p": float(t.pvalue)}


def wilcoxon(predicted: np.ndarray, reference: np.ndarray) -> dict:
    """Wilcoxon signed-rank test of the paired differences (two-sided)."""
    d = np.asarray(predicted, float) - np.asarray(reference, float)
    if d.size < 2 or np.all(d == 0):
        return {"n": int(d.size), "statistic": float("nan"), "p": float("nan")}
    res = stats.wilcoxon(predicted, reference)
    return {"n": int(d.size), "statistic": float(res.statistic), "p": float(res.pvalue)}


def categories(values: np.ndarray) -> list[str]:
    """Category of each BMD value."""
    return [bmd_category(float(v)) for v in values]


def category_agreement(predicted: list[str], reference: list[str]) -> dict:
    """Cohen's kappa and the 3 × 3 confusion matrix (rows reference, columns predicted, order CATEGORIES)."""
    from sklearn.metrics import cohen_kappa_score, confusion_matrix

    if not predicted:
        return {"n": 0, "kappa": float("nan"), "confusion": [[0] * 3 for _ in range(3)], "labels": list(CATEGORIES)}
    cm = confusion_matrix(reference, predicted, labels=list(CATEGORIES))
    if len(set(predicted) | set(reference)) < 2:
        kappa = 1.0 if predicted == reference else 0.0  # kappa is undefined with a single class; agreement says it
    else:
        kappa = float(cohen_kappa_score(reference, predicted, labels=list(CATEGORIES)))
    return {"n": len(predicted), "kappa": kappa, "accuracy": float(np.trace(cm) / cm.sum()),
            "confusion": cm.tolist(), "labels": list(CATEGORIES)}


def cohort_characteristics(cohorts: dict[str, list[dict]], categorical: tuple[str, ...],
                           continuous: tuple[str, ...]) -> dict:
    """Compare cohorts (name → list of per-patient dicts): chi-square for categorical keys, Kruskal–Wallis
    for continuous ones."""
    out: dict[str, dict] = {}
    names = list(cohorts)
    for key in categorical:
        values = sorted({str(p[key]) for c in cohorts.values() for p in c if p.get(key) is not None})
        table = np.array([[sum(str(p.get(key)) == v for p in cohorts[n]) for v in values] for n in names])
        table = table[:, table.sum(axis=0) > 0]
        if table.shape[0] < 2 or table.shape[1] < 2:
            out[key] = {"test": "chi-square", "table": table.tolist(), "values": values, "p": float("nan")}
            continue
        res = stats.chi2_contingency(table)
        out[key] = {"test": "chi-square", "values": values, "cohorts": names, "table": table.tolist(),
                    "chi2": float(res.statistic), "dof": int(res.dof), "p": float(res.pvalue)}
    for key in continuous:
        groups = [[float(p[key]) for p in cohorts[n] if p.get(key) is not None] for n in names]
        summary = {n: {"mean": float(np.mean(g)), "sd": float(np.std(g, ddof=1)) if len(g) > 1 else 0.0}
                   for n, g in zip_strict(names, groups) if g}
        if sum(1 for g in groups if len(g) > 0) < 2:
            out[key] = {"test": "Kruskal-Wallis", "summary": summary, "p": float("nan")}
            continue
        res = stats.kruskal(*[g for g in groups if g])
        out[key] = {"test": "Kruskal-Wallis", "summary": summary, "H": float(res.statistic), "p": float(res.pvalue)}
    return out


def bmd_statistics(pairs: Pairs) -> dict:
    """All BMD statistics of one cohort: per vertebra (r² with CI, Pearson, Bland–Altman, Wilcoxon), all levels
    together, per patient (mean of the measured levels) and the patients' category agreement."""
    pred, ref = pairs.predicted, pairs.reference
    level = np.array(pairs.level)
    per_level = {}
    for name in LEVEL_NAMES:
        m = level == name
        if m.sum() >= 2:
            per_level[name] = {"r2": r2_with_ci(pred[m], ref[m]), "pearson": pearson(pred[m], ref[m]),
                               "bland_altman": bland_altman(pred[m], ref[m])}
    patients = sorted(set(pairs.case))
    case = np.array(pairs.case)
    p_pred = np.array([pred[case == c].mean() for c in patients])
    p_ref = np.array([ref[case == c].mean() for c in patients])
    out = {
        "levels": per_level,
        "all_levels": {"r2": r2_with_ci(pred, ref), "pearson": pearson(pred, ref), "wilcoxon": wilcoxon(pred, ref),
                       **({"bland_altman": bland_altman(pred, ref)} if pred.size >= 2 else {})},
        "patients": {"n": len(patients), "pearson": pearson(p_pred, p_ref), "wilcoxon": wilcoxon(p_pred, p_ref),
                     **({"bland_altman": bland_altman(p_pred, p_ref)} if len(patients) >= 2 else {}),
                     "categories": category_agreement(categories(p_pred), categories(p_ref))},
    }
    return out


# ------------------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------------------
def plot_bland_altman(pairs: Pairs, stats_ba: dict, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from LumbarBMDLib.figures import LEVEL_COLOURS

    mean = (pairs.predicted + pairs.reference) / 2
    diff = pairs.predicted - pairs.reference
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    for value, name in enumerate(LEVEL_NAMES, start=1):
        m = np.array(pairs.level) == name
        ax.scatter(mean[m], diff[m], s=12, color=np.array(LEVEL_COLOURS[value]) / 255, label=name, alpha=0.8)
    ax.axhline(stats_ba["bias"], color="k", lw=1, label=f"bias {stats_ba['bias']:+.1f}")
    for v in stats_ba["loa"]:
        ax.axhline(v, color="k", lw=1, ls="--")
    ax.text(ax.get_xlim()[1], stats_ba["loa"][1], f" +1.96 SD {stats_ba['loa'][1]:+.1f}", va="bottom", ha="right")
    ax.text(ax.get_xlim()[1], stats_ba["loa"][0], f" −1.96 SD {stats_ba['loa'][0]:+.1f}", va="top", ha="right")
    ax.set_xlabel("mean of predicted and reference BMD (mg/cm³)")
    ax.set_ylabel("predicted − reference (mg/cm³)")
    ax.set_title(title or "Bland–Altman")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_scatter(pairs: Pairs, r: float, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from LumbarBMDLib.figures import LEVEL_COLOURS

    fig, ax = plt.subplots(figsize=(4.8, 4.6), dpi=110)
    lo = float(min(pairs.predicted.min(), pairs.reference.min())) - 5
    hi = float(max(pairs.predicted.max(), pairs.reference.max())) + 5
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=1)
    for v in (80, 120):
        ax.axvline(v, color="0.85", lw=0.8)
        ax.axhline(v, color="0.85", lw=0.8)
    for value, name in enumerate(LEVEL_NAMES, start=1):
        m = np.array(pairs.level) == name
        ax.scatter(pairs.reference[m], pairs.predicted[m], s=12, color=np.array(LEVEL_COLOURS[value]) / 255,
                   label=name, alpha=0.8)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("reference BMD (QCT, mg/cm³)")
    ax.set_ylabel("predicted BMD (mg/cm³)")
    ax.set_title(title or f"predicted vs reference (r = {r:.3f})")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion(agreement: dict, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(agreement["confusion"])
    fig, ax = plt.subplots(figsize=(4.6, 4.0), dpi=110)
    ax.imshow(cm, cmap="Blues")
    for i in range(3):
        for j in range(3):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "k")
    ax.set_xticks(range(3), agreement["labels"], rotation=20)
    ax.set_yticks(range(3), agreement["labels"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference (QCT)")
    ax.set_title(title or f"categories (kappa = {agreement['kappa']:.3f})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_evaluation(pairs: Pairs, out_dir: str | Path, extra: dict | None = None, title: str = "") -> dict:
    """Compute :func:`bmd_statistics`, write ``evaluation.json`` and the three plots to ``out_dir``."""
    if len(pairs.predicted) < 2:
        raise LumbarBMDError("fewer than two measured levels with a reference value: nothing to evaluate")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = bmd_statistics(pairs)
    result.update(extra or {})
    plot_bland_altman(pairs, result["all_levels"]["bland_altman"], out_dir / "bland_altman.png", title)
    plot_scatter(pairs, result["all_levels"]["pearson"]["r"], out_dir / "scatter.png", title)
    plot_confusion(result["patients"]["categories"], out_dir / "confusion_matrix.png", title)
    tmp = out_dir / ".evaluation.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=float), encoding="utf-8")
    tmp.replace(out_dir / "evaluation.json")
    return result


# ------------------------------------------------------------------------------------------------------------
# results folders (lumbarbmd evaluate RESULTS TRUTH --out DIR)
# ------------------------------------------------------------------------------------------------------------
#: Plausible reference BMD (mg/cm³, K2HPO4-equivalent QCT of lumbar trabecular bone). Adults span about 20–250
#: (young-adult peak ≈ 170–200, severe osteoporosis ≈ 30); calibration phantoms run to ~200. Nothing below 0 (less
#: dense than the water-equivalent baseline) or above 400 (beyond any trabecular bone: cortical bone, metal or a
#: unit mix-up such as g/cm² × 1000) is a measurement of the trabecular spine, so such a value is refused.
REFERENCE_BMD_RANGE = (0.0, 400.0)


def reference_bmd(value: object, where: str) -> float | None:
    """A reference BMD read from a file, checked: a number in :data:`REFERENCE_BMD_RANGE` (returned as float), or
    None when the value is missing (empty, null or NaN: that level has no reference). ``where`` names the file, case
    and level for the sentence raised on anything else."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise LumbarBMDError(f"{where}: reference BMD {value!r} is not a number")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise LumbarBMDError(f"{where}: reference BMD {value!r} is not a number") from None
    if np.isnan(number):
        return None
    lo, hi = REFERENCE_BMD_RANGE
    if not lo <= number <= hi:
        raise LumbarBMDError(f"{where}: reference BMD {value!r} mg/cm³ is outside the plausible range {lo:g}–{hi:g} "
                             "mg/cm³ (check the value and its unit)")
    return number


def read_truth_json(path: Path) -> tuple[str, dict]:
    """One phantom ``truth.json``: its case name and ``{"bmd": {level: value}, "patient": {...}, "folder": ...}``,
    checked (a JSON object with ``bmd_mg_cm3`` mapping L1–L4 to plausible values; levels without a value left out)."""
    from LumbarBMDLib.weights import read_json_object

    t = read_json_object(path, "reference file")
    case = t.get("case", path.parent.name)
    if not isinstance(case, str) or not case:
        raise LumbarBMDError(f"reference file {path}: 'case' must be the case's name (text), got {case!r}")
    values = t.get("bmd_mg_cm3")
    if not isinstance(values, dict):
        raise LumbarBMDError(f"reference file {path} has no 'bmd_mg_cm3' object (level → BMD), e.g. "
                             '{"bmd_mg_cm3": {"L1": 120.5, "L2": 118.0}}')
    bmd = {}
    for level, raw in values.items():
        if level not in LEVEL_NAMES:
            raise LumbarBMDError(f"reference file {path}: level {level!r} is not one of L1–L4")
        value = reference_bmd(raw, f"reference file {path}, case {case}, level {level}")
        if value is not None:
            bmd[level] = value
    patient = {k: t.get(k) for k in ("vendor", "sex", "age", "category", "mean_bmd_mg_cm3")}
    for key in ("age", "mean_bmd_mg_cm3"):  # continuous characteristics compared across cohorts
        v = patient[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v)):
            raise LumbarBMDError(f"reference file {path}: {key} must be a number or null, got {v!r}")
    return case, {"bmd": bmd, "patient": patient, "folder": str(path.parent)}


REFERENCE_CSV_COLUMNS = ("case", "level", "bmd_mg_cm3")


def read_reference_csv(path: str | Path) -> dict[str, dict[str, float]]:
    """``{case: {level: bmd}}`` from a reference CSV ``case,level,bmd_mg_cm3`` (every case named, also one whose
    values are all missing: ``{}``). Each value is checked (:func:`reference_bmd`); an empty case name, a level
    other than L1–L4, or two different values for one level are refused naming the line."""
    import csv

    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = set(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise LumbarBMDError(f"reference CSV {path} cannot be read as UTF-8 CSV ({err})") from None
    missing = set(REFERENCE_CSV_COLUMNS) - fields
    if missing:
        raise LumbarBMDError(f"{path}: missing column(s) {', '.join(sorted(missing))}: a reference CSV needs the "
                             "columns case, level, bmd_mg_cm3")
    out: dict[str, dict[str, float]] = {}
    for line, row in enumerate(rows, start=2):
        case, level = (row.get("case") or "").strip(), (row.get("level") or "").strip()
        if not case:
            raise LumbarBMDError(f"{path}, line {line}: the case name is empty")
        if level not in LEVEL_NAMES:
            raise LumbarBMDError(f"{path}, line {line}: level {row.get('level')!r} is not one of L1–L4")
        value = reference_bmd(row.get("bmd_mg_cm3"), f"{path}, line {line} (case {case}, level {level})")
        bmd = out.setdefault(case, {})
        if value is None:
            continue
        if level in bmd and bmd[level] != value:
            raise LumbarBMDError(f"{path}, line {line}: case {case} level {level} has two different reference "
                                 f"values ({bmd[level]:g} and {value:g})")
        bmd[level] = value
    return out


def read_truth(truth: str | Path) -> dict[str, dict]:
    """Reference per case: ``{case: {"bmd": {level: value}, "patient": {...}}}`` from a phantom cohort folder
    (``<case>/truth.json``) or a CSV ``case,level,bmd_mg_cm3``.

    Every value is checked (:func:`reference_bmd`): a number within :data:`REFERENCE_BMD_RANGE`, or missing (empty,
    null, NaN: that level has no reference). A reference without any usable value is refused.
    """

    truth = Path(truth)
    out: dict[str, dict] = {}
    if truth.is_file() and truth.suffix.lower() == ".csv":
        out = {case: {"bmd": bmd, "patient": {}} for case, bmd in read_reference_csv(truth).items()}
    elif not truth.is_dir():
        raise LumbarBMDError(f"reference not found: {truth} (a cohort folder with truth.json files, or a CSV)")
    else:
        for path in sorted(truth.rglob("truth.json")):
            case, entry = read_truth_json(path)
            if case in out:
                raise LumbarBMDError(f"reference file {path}: case {case} appears twice ({out[case]['folder']})")
            out[case] = entry
        if not out:
            raise LumbarBMDError(f"no truth.json under {truth}")
    if not any(entry["bmd"] for entry in out.values()):
        raise LumbarBMDError(f"reference {truth} holds no usable BMD value (all missing): nothing to evaluate against")
    return out


def _measured_bmd(v: object, path: Path) -> tuple[str, float] | None:
    """(level, BMD) of one measured entry of ``results.json``'s ``vertebrae``; None when the level was not measured;
    a malformed entry is a sentence naming the file."""
    if not isinstance(v, dict) or v.get("level") not in LEVEL_NAMES:
        raise LumbarBMDError(f"{path}: every entry of 'vertebrae' must be an object with a level L1–L4")
    if not v.get("found"):
        return None
    value = v.get("bmd_mg_cm3")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise LumbarBMDError(f"{path}: level {v['level']} is marked found but its bmd_mg_cm3 {value!r} is not a "
                             "finite number; run the case again")
    return v["level"], float(value)


def _case_id_of(folder: Path) -> str:
    """The case id a results folder records (``results.json`` ``case_id``; older results: the folder's name)."""
    try:
        res = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return folder.name
    cid = res.get("case_id") if isinstance(res, dict) else None
    return cid if isinstance(cid, str) and cid else folder.name


def collect_pairs(results_dir: str | Path, truth: dict[str, dict]) -> tuple[Pairs, dict]:
    """Pair every measured level of ``<results_dir>/<case>/results.json`` with its reference.

    Returns the pairs and a summary: cases read, failed, partial, unmatched, levels missing per reason, and how the
    cases' HU were calibrated and which contrast phase was read (:func:`calibration_tally`).
    """
    from LumbarBMDLib.weights import read_json_object

    results_dir = Path(results_dir)
    files = sorted(results_dir.rglob("results.json"))
    if not files:
        raise LumbarBMDError(f"no results.json under {results_dir} (the output folder of 'lumbarbmd run')")
    cases, levels, pred, ref = [], [], [], []
    summary = {"cases": 0, "ok": 0, "partial": 0, "failed": 0, "unmatched": [], "missing_levels": {}}
    tally = CalibrationTally()
    for f in files:
        res = read_json_object(f, "results file")
        tally.add(res)
        case = res.get("case_id") if isinstance(res.get("case_id"), str) and res.get("case_id") else f.parent.name
        status = res.get("status", "failed")
        if not isinstance(status, str) or not status:
            raise LumbarBMDError(f"results file {f}: status {status!r} is not a status such as ok, partial or failed")
        vertebrae = res.get("vertebrae", [])
        if not isinstance(vertebrae, list):
            raise LumbarBMDError(f"results file {f}: 'vertebrae' must be a list")
        summary["cases"] += 1
        summary[status] = summary.get(status, 0) + 1
        if case not in truth:
            summary["unmatched"].append(case)
            continue
        for v in vertebrae:
            measured = _measured_bmd(v, f)
            if measured is None:
                reason = str(v.get("reason") or "not found")
                summary["missing_levels"][reason] = summary["missing_levels"].get(reason, 0) + 1
                continue
            level, value = measured
            if level in truth[case]["bmd"]:
                cases.append(case)
                levels.append(level)
                pred.append(value)
                ref.append(truth[case]["bmd"][level])
    summary["calibration"] = tally.as_json()
    return Pairs(cases, levels, np.array(pred), np.array(ref)), summary


@dataclass
class CalibrationTally:
    """How a results folder's cases were calibrated (results.json ``calibration``) and which contrast phases were
    read (``scanner.contrast_phase``): counts, and the internal fits' effective energy and K2HPO4 slope."""

    sources: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)
    energies_kev: list = field(default_factory=list)
    slopes: list = field(default_factory=list)
    contrast_corrected: int = 0

    def add(self, res: dict) -> None:
        """Count one results.json object (a failed case without a calibration counts as "none")."""
        cal = res.get("calibration") if isinstance(res.get("calibration"), dict) else {}
        source = str(cal.get("source") or "none")
        self.sources[source] = self.sources.get(source, 0) + 1
        if (cal.get("contrast_delta_hu") or 0) > 0:
            self.contrast_corrected += 1
        scanner = res.get("scanner") if isinstance(res.get("scanner"), dict) else {}
        phase = (scanner.get("contrast_phase") or {}).get("phase")
        if phase:
            self.phases[str(phase)] = self.phases.get(str(phase), 0) + 1
        fit = scanner.get("internal_calibration") or {}
        if fit.get("verdict") == "ok" and isinstance(fit.get("effective_energy_kev"), (int, float)):
            self.energies_kev.append(float(fit["effective_energy_kev"]))
            self.slopes.append(float(fit["slope"]))

    def as_json(self) -> dict:
        def spread(v: list) -> dict | None:
            return None if not v else {"mean": round(float(np.mean(v)), 3), "sd": round(float(np.std(v)), 3),
                                       "min": round(float(np.min(v)), 3), "max": round(float(np.max(v)), 3)}
        return {"sources": dict(sorted(self.sources.items())), "contrast_phases": dict(sorted(self.phases.items())),
                "contrast_corrected": self.contrast_corrected,
                "internal_effective_energy_kev": spread(self.energies_kev),
                "internal_k2hpo4_slope": spread(self.slopes)}


def evaluate_folder(results_dir: str | Path, truth_path: str | Path, out_dir: str | Path, title: str = "") -> dict:
    """``lumbarbmd evaluate``: all statistics of a results folder against its reference, plots and JSON."""
    truth = read_truth(truth_path)
    pairs, summary = collect_pairs(results_dir, truth)
    extra: dict = {"cases": summary}
    seg = segmentation_from_folders(results_dir, truth)
    if seg:
        extra["segmentation"] = seg
    evaluated = set(pairs.case)
    groups: dict[str, list[dict]] = {}
    for case, t in truth.items():
        if case in evaluated and t["patient"].get("vendor"):
            groups.setdefault(f"vendor {t['patient']['vendor']}", []).append(t["patient"])
    if len(groups) >= 2:  # the paper's cohort comparison (chi-square) between the scanners' cohorts
        extra["cohort_characteristics"] = cohort_characteristics(groups, ("sex", "category"),
                                                                 ("age", "mean_bmd_mg_cm3"))
    return write_evaluation(pairs, out_dir, extra, title)


def segmentation_from_folders(results_dir: str | Path, truth: dict[str, dict]) -> dict | None:
    """DSC / PPV / sensitivity per vertebra and the valid rate, when the results hold ``sagittal_labels.nii.gz``
    and the reference folders hold the 3-D ``vertebrae.nii.gz`` (resampled onto the same 16 mm slab)."""
    import SimpleITK as sitk

    from LumbarBMDLib.metrics import segmentation_metrics, summarise
    from LumbarBMDLib.sagittal import ANNOTATION_SLICES, SagittalGeometry, sagittal_label_image
    from LumbarBMDLib.volume import CTVolume

    per_case = []
    for f in sorted(Path(results_dir).rglob("sagittal_labels.nii.gz")):
        case = _case_id_of(f.parent)
        folder = truth.get(case, {}).get("folder")
        if not folder or not (Path(folder) / "vertebrae.nii.gz").is_file():
            continue
        pred_img = sitk.ReadImage(str(f))
        pred = sitk.GetArrayFromImage(pred_img)[0]
        geom = SagittalGeometry.from_image(pred_img)
        slab = geom.slab(ANNOTATION_SLICES)
        ref_img = sitk.ReadImage(str(Path(folder) / "vertebrae.nii.gz"))
        ref_vol = CTVolume.from_sitk(ref_img)
        ref = sagittal_label_image(ref_vol, slab)
        per_case.append(segmentation_metrics(pred, ref))
    return summarise(per_case) if per_case else None
