"""The paper's statistics against hand-checked examples."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from LumbarBMDLib.errors import LumbarBMDError
from LumbarBMDLib.evaluation import (
    Pairs,
    bland_altman,
    category_agreement,
    cohort_characteristics,
    pearson,
    r2_with_ci,
    wilcoxon,
    write_evaluation,
)

X = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
Y = np.array([2.0, 4.0, 5.0, 4.0, 5.0])


def test_pearson_and_r2_ci_by_hand():
    # r = Sxy / sqrt(Sxx Syy): Sxy = 6, Sxx = 10, Syy = 6  ->  r = 6 / sqrt(60) = 0.774597
    assert pearson(X, Y)["r"] == pytest.approx(6 / math.sqrt(60))
    res = r2_with_ci(X, Y)
    assert res["r2"] == pytest.approx(0.6)
    # Fisher z: z = atanh(r), SE = 1 / sqrt(n - 3); CI = tanh(z -/+ 1.959964 SE), clipped at 0, squared
    z, se = math.atanh(6 / math.sqrt(60)), 1 / math.sqrt(2)
    lo, hi = math.tanh(z - 1.959964 * se), math.tanh(z + 1.959964 * se)
    assert res["ci"] == pytest.approx([max(lo, 0) ** 2, hi**2], abs=1e-5)


def test_bland_altman_by_hand():
    pred = np.array([102.0, 98.0, 111.0, 95.0])
    ref = np.array([100.0, 100.0, 105.0, 97.0])
    # differences 2, -2, 6, -2: mean 1, SD sqrt(((1)^2 + 3^2 + 5^2 + 3^2) / 3) = sqrt(44 / 3)
    ba = bland_altman(pred, ref)
    sd = math.sqrt(44 / 3)
    assert ba["bias"] == pytest.approx(1.0) and ba["sd"] == pytest.approx(sd)
    assert ba["loa"] == pytest.approx([1 - 1.96 * sd, 1 + 1.96 * sd])
    half = 3.182446 * sd / 2  # t(0.975, 3) * SD / sqrt(4)
    assert ba["bias_ci"] == pytest.approx([1 - half, 1 + half], abs=1e-4)
    with pytest.raises(LumbarBMDError):
        bland_altman(pred[:1], ref[:1])


def test_wilcoxon_by_hand():
    # all five differences positive: W- = 0; the exact two-sided p = 2 / 2^5 = 0.0625
    res = wilcoxon(X + np.array([1, 2, 3, 4, 5]), X)
    assert res["statistic"] == 0.0 and res["p"] == pytest.approx(0.0625)
    assert math.isnan(wilcoxon(X, X)["p"])  # no differences: no test


def test_kappa_and_confusion_by_hand():
    ref = ["normal"] * 5 + ["osteopenia"] * 3 + ["osteoporosis"] * 2
    pred = ["normal"] * 4 + ["osteopenia"] + ["osteopenia"] * 2 + ["osteoporosis"] + ["osteoporosis"] * 2
    res = category_agreement(pred, ref)
    # rows reference (osteoporosis, osteopenia, normal), columns predicted
    assert res["confusion"] == [[2, 0, 0], [1, 2, 0], [0, 1, 4]]
    # p_o = 8/10; p_e = (2*3 + 3*3 + 5*4) / 100 = 0.35; kappa = (0.8 - 0.35) / 0.65
    assert res["kappa"] == pytest.approx(0.45 / 0.65)
    assert res["accuracy"] == pytest.approx(0.8)


def test_cohort_characteristics_by_hand():
    a = [{"sex": "F", "age": float(v)} for v in range(10)] + [{"sex": "M", "age": 50.0} for _ in range(20)]
    b = [{"sex": "F", "age": 60.0} for _ in range(20)] + [{"sex": "M", "age": 70.0} for _ in range(10)]
    res = cohort_characteristics({"A": a, "B": b}, ("sex",), ("age",))
    # 2 x 2 table [[10, 20], [20, 10]], expected 15 everywhere; Yates: 4 * (|5| - 0.5)^2 / 15 = 5.4
    assert res["sex"]["table"] == [[10, 20], [20, 10]] and res["sex"]["chi2"] == pytest.approx(5.4)
    assert res["sex"]["dof"] == 1 and 0.01 < res["sex"]["p"] < 0.05
    assert res["age"]["test"] == "Kruskal-Wallis" and res["age"]["p"] < 0.001


def test_write_evaluation_files(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.uniform(50, 180, 40)
    pairs = Pairs([f"c{i // 4}" for i in range(40)], ["L1", "L2", "L3", "L4"] * 10, ref + rng.normal(1, 3, 40), ref)
    res = write_evaluation(pairs, tmp_path)
    for name in ("evaluation.json", "bland_altman.png", "scatter.png", "confusion_matrix.png"):
        assert (tmp_path / name).stat().st_size > 1000 or name == "evaluation.json"
    saved = json.loads((tmp_path / "evaluation.json").read_text(encoding="utf-8"))
    assert saved["all_levels"]["pearson"]["r"] == pytest.approx(res["all_levels"]["pearson"]["r"])
    assert set(saved["levels"]) == {"L1", "L2", "L3", "L4"} and saved["patients"]["n"] == 10
    assert saved["all_levels"]["pearson"]["r"] > 0.99


def test_evaluate_folder_compares_the_vendors_cohorts(tmp_path):
    from LumbarBMDLib.evaluation import evaluate_folder

    rng = np.random.default_rng(1)
    for i in range(12):
        vendor, case = "AB"[i % 2], f"{'AB'[i % 2]}_{i:06d}"
        bmd = {lv: float(rng.uniform(60, 170)) for lv in ("L1", "L2", "L3", "L4")}
        mean = float(np.mean(list(bmd.values())))
        truth = {"case": case, "bmd_mg_cm3": bmd, "mean_bmd_mg_cm3": mean, "vendor": vendor, "sex": "FM"[i % 3 == 0],
                 "age": 50.0 + i, "category": "normal" if mean > 120 else "osteopenia"}
        (tmp_path / "truth" / case).mkdir(parents=True)
        (tmp_path / "truth" / case / "truth.json").write_text(json.dumps(truth), encoding="utf-8")
        vertebrae = [{"level": lv, "found": True, "bmd_mg_cm3": v + rng.normal(0, 2)} for lv, v in bmd.items()]
        (tmp_path / "results" / case).mkdir(parents=True)
        (tmp_path / "results" / case / "results.json").write_text(
            json.dumps({"status": "ok", "vertebrae": vertebrae}), encoding="utf-8")
    res = evaluate_folder(tmp_path / "results", tmp_path / "truth", tmp_path / "out")
    chars = res["cohort_characteristics"]
    assert chars["sex"]["test"] == "chi-square" and chars["sex"]["cohorts"] == ["vendor A", "vendor B"]
    assert np.array(chars["sex"]["table"]).sum() == 12 and 0.0 <= chars["sex"]["p"] <= 1.0
    assert chars["age"]["test"] == "Kruskal-Wallis" and res["all_levels"]["pearson"]["n"] == 48


def test_evaluate_reports_how_the_cases_were_calibrated_and_their_phase(tmp_path):
    """evaluation.json (and the CLI's summary) count the calibration each case used and the contrast phase read,
    and give the internal fits' effective energy and K2HPO4 slope; a failed case without a calibration is "none"."""
    from LumbarBMDLib.cli import format_evaluation
    from LumbarBMDLib.evaluation import evaluate_folder

    specs = [("internal", "non_contrast", 0.0, 74.0, 1.36), ("internal", "portal_venous", 17.4, 76.0, 1.33),
             ("phantom", "arterial", 12.9, 75.0, 1.35), ("nominal", "unknown", 0.0, None, None), (None, None, 0, None,
                                                                                                    None)]
    for i, (source, phase, delta, e, k) in enumerate(specs):
        case = f"A_{i:06d}"
        bmd = {lv: 100.0 + 10 * i + j for j, lv in enumerate(("L1", "L2", "L3", "L4"))}
        (tmp_path / "truth" / case).mkdir(parents=True)
        (tmp_path / "truth" / case / "truth.json").write_text(json.dumps(
            {"case": case, "bmd_mg_cm3": bmd, "mean_bmd_mg_cm3": float(np.mean(list(bmd.values())))}), "utf-8")
        res = {"status": "ok" if source else "failed",
               "vertebrae": [{"level": lv, "found": True, "bmd_mg_cm3": v + 1.0} for lv, v in bmd.items()]
               if source else []}
        if source:
            res["calibration"] = {"source": source, "contrast_delta_hu": delta}
            fit = {"verdict": "ok", "effective_energy_kev": e, "slope": k} if e else {"verdict": "poor"}
            res["scanner"] = {"contrast_phase": {"phase": phase}, "internal_calibration": fit}
        (tmp_path / "results" / case).mkdir(parents=True)
        (tmp_path / "results" / case / "results.json").write_text(json.dumps(res), encoding="utf-8")
    out = evaluate_folder(tmp_path / "results", tmp_path / "truth", tmp_path / "out")
    cal = out["cases"]["calibration"]
    assert cal["sources"] == {"internal": 2, "nominal": 1, "none": 1, "phantom": 1}
    assert cal["contrast_phases"] == {"arterial": 1, "non_contrast": 1, "portal_venous": 1, "unknown": 1}
    assert cal["contrast_corrected"] == 2
    assert cal["internal_effective_energy_kev"]["mean"] == pytest.approx(75.0)
    assert cal["internal_k2hpo4_slope"]["min"] == pytest.approx(1.33)
    saved = json.loads((tmp_path / "out" / "evaluation.json").read_text(encoding="utf-8"))
    assert saved["cases"]["calibration"] == cal
    text = format_evaluation(out)
    assert "calibration: internal 2, nominal 1, none 1, phantom 1" in text and "portal venous 1" in text
