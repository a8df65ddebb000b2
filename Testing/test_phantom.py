"""Tests of the synthetic lumbar CT phantom (LumbarBMDLib.phantom): determinism, truth, labels, realism
against the real development CT, variants and files. Real generated cases, no mocks."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from LumbarBMDLib.phantom import (
    COHORT_COLUMNS,
    SIZES,
    VARIANTS,
    PhantomCase,
    anatomy,
    generate_case,
    generate_cohort,
    render,
    write_case,
)
from LumbarBMDLib.phantom.render import Tissue
from LumbarBMDLib.phantom.scanner import SCANNERS
from LumbarBMDLib.volume import read_ct

LEVELS = ("L1", "L2", "L3", "L4")
REAL_LEVEL_LABELS = {"L1": 31, "L2": 30, "L3": 29, "L4": 28}  # TotalSegmentator vertebra label values
REAL_LUMBAR = (27, 28, 29, 30, 31)  # L5 … L1
PHANTOM_LUMBAR_BODIES = (1, 2, 3, 4, 5)
PHANTOM_LUMBAR_POSTERIOR = (101, 102, 103, 104, 105)
SOFT_CODES = (Tissue.SOFT, Tissue.ORGAN, Tissue.FAT, Tissue.CSF)
CANAL_CODES = (Tissue.CSF, Tissue.EPIDURAL_FAT)
SEED = 11  # the seed of the conftest ``small_case``


# ---------------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(small_case):
    """``small(variant="none", vendor="A", seed=SEED, category=None)``: small cases, each generated once."""
    cache: dict[tuple, PhantomCase] = {(SEED, "A", "none", None): small_case}

    def get(variant: str = "none", vendor: str = "A", seed: int = SEED, category: str | None = None) -> PhantomCase:
        key = (seed, vendor, variant, category)
        if key not in cache:
            cache[key] = generate_case(seed, vendor, "small", variant, category=category)
        return cache[key]

    return get


def spongiosa_mean_hu(case: PhantomCase, label: int = 3) -> float:
    """Mean CT HU over the body's spongiosa (trabecular tissue of ``label``) eroded by one voxel."""
    mask = ndimage.binary_erosion((case.tissue == Tissue.TRABECULAR) & (case.labels == label))
    assert mask.sum() > 200
    return float(case.ct.hu[mask].mean())


def centroid_lps(case: PhantomCase, label: int) -> np.ndarray:
    """LPS centroid (mm) of the voxels of ``label``."""
    zz, yy, xx = np.nonzero(case.labels == label)
    assert zz.size > 0, f"label {label} absent"
    return case.ct.index_to_lps(np.stack([xx, yy, zz], axis=1).astype(float)).mean(axis=0)


def _to_3mm(case: PhantomCase) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The phantom CT around the lumbar spine at 3 mm isotropic like the real example (Gaussian σ 1.1 mm, then
    linear resampling; labels and tissue by nearest neighbour). Returns (hu, labels, tissue) as ``(z, y, x)``."""
    lumbar = np.isin(case.labels, PHANTOM_LUMBAR_BODIES + PHANTOM_LUMBAR_POSTERIOR)
    idx = np.nonzero(lumbar)  # z, y, x
    spacing = case.ct.spacing
    lo, hi = [], []
    for axis_xyz, ind in zip(range(3), idx[::-1], strict=True):  # x, y, z
        margin = int(np.ceil(30.0 / spacing[axis_xyz]))
        lo.append(max(0, int(ind.min()) - margin))
        hi.append(min(case.ct.shape[2 - axis_xyz], int(ind.max()) + margin + 1))

    def crop(arr: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]))
        img.SetSpacing(spacing)
        img.SetOrigin(tuple(case.ct.index_to_lps(np.array(lo, float))))
        img.SetDirection(tuple(case.ct.direction.flatten()))
        return img

    ct = crop(case.ct.hu.astype(np.float32))
    ref = sitk.Image([int((hi[a] - lo[a]) * spacing[a] / 3.0) for a in range(3)], sitk.sitkFloat32)
    ref.SetSpacing((3.0, 3.0, 3.0))
    ref.SetOrigin(ct.GetOrigin())
    ref.SetDirection(ct.GetDirection())
    smooth = sitk.SmoothingRecursiveGaussian(ct, 1.1)
    hu = sitk.GetArrayFromImage(sitk.Resample(smooth, ref, sitk.Transform(), sitk.sitkLinear, -1024.0))
    nearest = [
        sitk.GetArrayFromImage(sitk.Resample(crop(a), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0))
        for a in (case.labels, case.tissue)
    ]
    return hu, nearest[0].astype(np.int32), nearest[1].astype(np.int32)


@pytest.fixture(scope="module")
def phantom_3mm():
    """A full-size osteopenic phantom (vendor A, 120 kVp physics) on the real example's 3 mm grid.

    Osteopenic, not normal: on a 120 kVp scanner K2HPO4 reads 1.36 HU per mg/cm³ (phantom/physics.py), so the real
    example's bodies (163–189 HU at 3 mm) are those of a spine of ≈ 100 mg/cm³, which is also what the pipeline
    measures on it (its internal calibration, README); a normal-density phantom (130–140) reads ≈ 220 HU there.
    """
    return _to_3mm(generate_case(101, "A", "full", category="osteopenia"))


@pytest.fixture(scope="module")
def real_3mm(real_dir):
    """The real example: (hu, vertebra labels, body/disc labels) on its 3 mm grid."""
    arrays = [
        sitk.GetArrayFromImage(sitk.ReadImage(str(real_dir / name)))
        for name in ("ct.nii.gz", "vertebrae_totalseg.nii.gz", "vertebral_bodies_totalseg.nii.gz")
    ]
    assert arrays[0].shape == arrays[1].shape == arrays[2].shape
    return arrays[0].astype(np.float32), arrays[1].astype(np.int32), arrays[2].astype(np.int32)


def shell_fraction_above_150(hu: np.ndarray, vertebra_mask: np.ndarray) -> float:
    """Fraction > 150 HU of the soft-tissue shell 2–4 voxels around ``vertebra_mask`` (HU > −200 only)."""
    outer = ndimage.binary_dilation(vertebra_mask, iterations=4)
    inner = ndimage.binary_dilation(vertebra_mask, iterations=1)
    shell = outer & ~inner & (hu > -200.0)
    assert shell.sum() > 1000
    return float((hu[shell] > 150.0).mean())


# ---------------------------------------------------------------------------------------------------
# 1. determinism and paired vendors
# ---------------------------------------------------------------------------------------------------
def test_same_arguments_give_identical_case(small_case):
    again = generate_case(SEED, "A", "small", "none")
    assert again.case_id == small_case.case_id == f"A_{SEED:06d}"
    assert again.ct.hu.dtype == np.int16
    np.testing.assert_array_equal(again.ct.hu, small_case.ct.hu)
    np.testing.assert_array_equal(again.labels, small_case.labels)
    np.testing.assert_array_equal(again.tissue, small_case.tissue)
    np.testing.assert_array_equal(again.annotation_image, small_case.annotation_image)
    assert again.truth == small_case.truth


def spongiosa_hu(level_truth: dict, scanner) -> float:
    """The spongiosa's mean HU of a level (truth.json) on ``scanner``: its mineral line plus its marrow-fat term,
    which scales with fat's contrast on that scanner (render.trabecular_hu)."""
    marrow = (render.MARROW_FAT_HU_PER_FRACTION * (level_truth["marrow_fat_fraction"] - 0.35)
              * render.fat_contrast_scale(scanner))
    return scanner.mineral_to_hu(level_truth["bmd_mg_cm3"]) + marrow


def test_same_seed_other_vendor_is_same_patient_on_another_scanner(small):
    a, b = small(vendor="A"), small(vendor="B")
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.truth["bmd_mg_cm3"] == b.truth["bmd_mg_cm3"]
    assert a.truth["mean_bmd_mg_cm3"] == b.truth["mean_bmd_mg_cm3"]
    assert (a.truth["vendor"], b.truth["vendor"]) == ("A", "B")
    assert not np.array_equal(a.ct.hu, b.ct.hu)
    # B's mineral line and marrow-fat contrast (135 kVp) against A's (120 kVp) at this patient's L3
    vert = a.truth["levels"]["L3"]
    expected = spongiosa_hu(vert, SCANNERS["B"]) - spongiosa_hu(vert, SCANNERS["A"])
    truth_diff = b.truth["levels"]["L3"]["trabecular_hu"] - a.truth["levels"]["L3"]["trabecular_hu"]
    assert truth_diff == pytest.approx(expected, abs=0.02)
    measured = spongiosa_mean_hu(b) - spongiosa_mean_hu(a)
    assert measured == pytest.approx(expected, abs=3.0)


# ---------------------------------------------------------------------------------------------------
# 2. truth consistency and categories
# ---------------------------------------------------------------------------------------------------
def test_truth_mean_and_category_are_consistent(small_case, full_normal_case):
    for case in (small_case, full_normal_case):
        t = case.truth
        assert set(t["bmd_mg_cm3"]) == set(LEVELS)
        mean = float(np.mean([t["bmd_mg_cm3"][n] for n in LEVELS]))
        assert t["mean_bmd_mg_cm3"] == pytest.approx(mean, abs=1e-3)
        assert t["category"] == anatomy.category_of(t["mean_bmd_mg_cm3"])
        for n in LEVELS:
            assert t["levels"][n]["bmd_mg_cm3"] == t["bmd_mg_cm3"][n]
            assert t["levels"][n]["category"] == anatomy.category_of(t["bmd_mg_cm3"][n])
    assert full_normal_case.truth["category"] == "normal"
    assert full_normal_case.truth["mean_bmd_mg_cm3"] > 120.0


@pytest.mark.parametrize(
    ("bmd", "category"),
    [
        (0.0, "osteoporosis"),
        (79.999, "osteoporosis"),
        (80.0, "osteopenia"),
        (100.0, "osteopenia"),
        (120.0, "osteopenia"),
        (120.001, "normal"),
        (250.0, "normal"),
    ],
)
def test_category_boundaries(bmd, category):
    assert anatomy.category_of(bmd) == category


@pytest.mark.parametrize(("category", "seed"), [("osteoporosis", 15), ("osteopenia", 11), ("normal", 11)])
def test_category_argument_forces_category(small, category, seed):
    case = small(seed=seed, category=category)
    assert case.truth["category"] == category
    assert anatomy.category_of(case.truth["mean_bmd_mg_cm3"]) == category
    assert small(seed=seed).truth["category"] != category  # the seed's own draw falls in another category


def test_cohort_category_distribution():
    rng = np.random.default_rng(0)
    values = np.array([anatomy.sample_mean_bmd(rng) for _ in range(3000)])
    fractions = {
        "osteoporosis": float(np.mean(values < 80.0)),
        "osteopenia": float(np.mean((values >= 80.0) & (values <= 120.0))),
        "normal": float(np.mean(values > 120.0)),
    }
    for name, expected in {"osteoporosis": 0.17, "osteopenia": 0.42, "normal": 0.41}.items():
        assert abs(fractions[name] - expected) <= 0.03, fractions


def test_sampled_bmd_is_physically_possible():
    """No BMD may be negative: the osteoporosis tail is documented to reach about 25 mg/cm³, and
    ``sample_patient`` floors every level at 15 mg/cm³."""
    rng = np.random.default_rng(0)
    values = np.array([anatomy.sample_mean_bmd(rng) for _ in range(3000)])
    assert values.min() > 0.0, np.sort(values)[:5]
    patient = anatomy.sample_patient(np.random.default_rng([2958, 0]), 2958)  # the seed generate_case(2958) uses
    assert min(v.bmd for v in patient.vertebrae) >= 15.0, patient.bmd_by_level


# ---------------------------------------------------------------------------------------------------
# 3. labels
# ---------------------------------------------------------------------------------------------------
def test_small_case_label_values_and_order(small_case):
    present = set(np.unique(small_case.labels).tolist())
    assert {1, 2, 3, 4, 5, 11, 12, 20} <= present
    assert {101, 102, 103, 104, 105, 111, 112} <= present
    assert 6 not in present and 106 not in present
    assert small_case.labels.dtype == np.uint8
    assert small_case.labels.shape == small_case.ct.shape == small_case.tissue.shape
    z = {n: centroid_lps(small_case, v)[2] for n, v in zip(LEVELS, (1, 2, 3, 4), strict=True)}
    assert z["L1"] > z["L2"] > z["L3"] > z["L4"]
    # the index axis k runs superior: the z index centroid orders the same way
    kz = [np.nonzero(small_case.labels == v)[0].mean() for v in (1, 2, 3, 4)]
    assert kz[0] > kz[1] > kz[2] > kz[3]


def test_six_lumbar_variant_adds_l6(small):
    case = small("six-lumbar")
    present = set(np.unique(case.labels).tolist())
    assert {6, 106} <= present
    assert case.truth["variants"]["six_lumbar"] is True
    assert centroid_lps(case, 6)[2] < centroid_lps(case, 5)[2]


@pytest.mark.parametrize(("variant", "missing", "label"), [("partial-L1", "L1", 1), ("partial-L4", "L4", 4)])
def test_partial_coverage_variants(small, variant, missing, label):
    case, normal = small(variant), small()
    assert case.truth["levels_in_view"] == [n for n in LEVELS if n != missing]
    assert case.truth["variants"]["missing_level"] == missing
    normal_voxels = int((normal.labels == label).sum())
    assert normal_voxels > 500
    assert (case.labels == label).sum() < 0.5 * normal_voxels
    assert case.truth["levels"][missing]["in_view_fraction"] < 0.5
    assert case.ct.shape[0] < normal.ct.shape[0]


# ---------------------------------------------------------------------------------------------------
# 4.–5. realism against the real CT at 3 mm
# ---------------------------------------------------------------------------------------------------
def test_body_and_disc_hu_match_real_ct(phantom_3mm, real_3mm):
    hu, vert, bodies = real_3mm
    real = {n: float(hu[(vert == v) & (bodies == 1)].mean()) for n, v in REAL_LEVEL_LABELS.items()}
    real_disc = float(hu[bodies == 2].mean())
    # the numbers the data's README reports
    for n, expected in {"L1": 163, "L2": 174, "L3": 178, "L4": 189}.items():
        assert real[n] == pytest.approx(expected, abs=1.5)
    assert real_disc == pytest.approx(86, abs=1.5)

    p_hu, p_labels, p_tissue = phantom_3mm
    phantom = {n: float(p_hu[p_labels == v].mean()) for n, v in zip(LEVELS, (1, 2, 3, 4), strict=True)}
    phantom_disc = float(p_hu[p_tissue == Tissue.DISC].mean())
    lo, hi = min(real.values()), max(real.values())
    assert lo - 10.0 <= np.mean(list(phantom.values())) <= hi + 10.0, (phantom, real)
    for n in LEVELS:
        assert lo - 20.0 <= phantom[n] <= hi + 20.0, (n, phantom, real)
    assert abs(phantom_disc - real_disc) <= 15.0, (phantom_disc, real_disc)


def test_posterior_elements_above_150_hu_like_real_ct(phantom_3mm, real_3mm):
    hu, vert, bodies = real_3mm
    real_post = np.isin(vert, REAL_LUMBAR) & (bodies != 1)
    real_fraction = float((hu[real_post] > 150.0).mean())
    p_hu, p_labels, _ = phantom_3mm
    p_post = np.isin(p_labels, PHANTOM_LUMBAR_POSTERIOR)
    assert p_post.sum() > 1000
    phantom_fraction = float((p_hu[p_post] > 150.0).mean())
    assert abs(phantom_fraction - real_fraction) <= 0.15, (phantom_fraction, real_fraction)


def test_soft_tissue_around_vertebrae_stays_below_150_hu(phantom_3mm, real_3mm):
    hu, vert, _ = real_3mm
    real_fraction = shell_fraction_above_150(hu, np.isin(vert, REAL_LUMBAR))
    p_hu, p_labels, _ = phantom_3mm
    phantom_fraction = shell_fraction_above_150(
        p_hu, np.isin(p_labels, PHANTOM_LUMBAR_BODIES + PHANTOM_LUMBAR_POSTERIOR)
    )
    assert phantom_fraction <= real_fraction + 0.03, (phantom_fraction, real_fraction)


def test_150_hu_threshold_separates_bone_from_soft_tissue_at_native_resolution(full_normal_case):
    case = full_normal_case
    cortex = (case.tissue == Tissue.CORTICAL) & np.isin(case.labels, (1, 2, 3, 4))
    assert cortex.sum() > 1000
    assert (case.ct.hu[cortex] > 150).mean() >= 0.90
    soft = np.isin(case.tissue, SOFT_CODES)
    assert soft.sum() > 100_000
    assert (case.ct.hu[soft] > 150).mean() <= 0.01


# ---------------------------------------------------------------------------------------------------
# 6. anatomical dimensions measured on the labels
# ---------------------------------------------------------------------------------------------------
def test_l3_body_and_canal_dimensions(full_normal_case):
    case = full_normal_case
    sx, sy, sz = case.ct.spacing
    body = case.labels == 3
    kc, jc, ic = (round(c) for c in ndimage.center_of_mass(body))
    jj, ii = np.nonzero(body[kc])
    width, depth = (np.ptp(ii) + 1) * sx, (np.ptp(jj) + 1) * sy
    assert 38.0 <= width <= 55.0, width
    assert 28.0 <= depth <= 42.0, depth
    column = np.flatnonzero(body[:, jc, ic])
    height = (np.ptp(column) + 1) * sz
    assert 20.0 <= height <= 34.0, height

    canal = np.isin(case.tissue[kc], CANAL_CODES)
    components, n = ndimage.label(canal)
    assert n >= 1
    slices = case.truth["canal"]["slice_indices"]
    assert kc in slices
    centre = case.ct.lps_to_index(case.truth["canal"]["centres_lps"][slices.index(kc)])
    best = min(
        range(1, n + 1), key=lambda c: np.hypot(*(np.array(ndimage.center_of_mass(components == c)) - centre[[1, 0]]))
    )
    cj, ci = np.nonzero(components == best)
    canal_width, canal_depth = (np.ptp(ci) + 1) * sx, (np.ptp(cj) + 1) * sy
    assert 17.0 <= canal_width <= 28.0, canal_width
    assert 12.0 <= canal_depth <= 21.0, canal_depth
    # the canal lies behind (posterior, larger y) the body
    assert cj.mean() > jj.mean()


def test_lordosis(full_normal_case):
    case = full_normal_case
    assert 40.0 <= case.truth["patient"]["lordosis_deg"] <= 60.0
    c1, c3, c5 = (centroid_lps(case, v) for v in (1, 3, 5))
    t = (c3[2] - c1[2]) / (c5[2] - c1[2])
    y_line = c1[1] + t * (c5[1] - c1[1])
    assert c3[1] < y_line - 3.0, (c3, y_line)  # L3 is anterior of the L1–L5 chord: a lordotic curve


# ---------------------------------------------------------------------------------------------------
# 7. calibration in the image
# ---------------------------------------------------------------------------------------------------
def test_spongiosa_hu_follows_each_vendors_calibration(small):
    cases = {v: small(vendor=v) for v in "ABC"}
    measured = {v: spongiosa_mean_hu(c) for v, c in cases.items()}
    for v, c in cases.items():
        assert measured[v] == pytest.approx(c.truth["levels"]["L3"]["trabecular_hu"], abs=8.0), (v, measured)
        assert c.truth["scanner"]["vendor"] == v
    vert = cases["A"].truth["levels"]["L3"]
    calibrated = {v: spongiosa_hu(vert, SCANNERS[v]) for v in "ABC"}
    assert sorted("ABC", key=measured.get) == sorted("ABC", key=calibrated.get)
    for v in "BC":
        assert measured[v] - measured["A"] == pytest.approx(calibrated[v] - calibrated["A"], abs=3.0)


# ---------------------------------------------------------------------------------------------------
# 8. noise
# ---------------------------------------------------------------------------------------------------
def test_low_dose_has_more_noise(small):
    normal, low = small(), small("low-dose")
    assert low.truth["variants"]["low_dose"] is True
    assert low.truth["scanner"]["noise_sd"] == pytest.approx(2.5 * normal.truth["scanner"]["noise_sd"])
    # noise = median SD in 5 × 5 in-plane windows lying wholly inside fat (eroded by 2 voxels), so that slow
    # anatomical differences between fat compartments do not count as noise
    fat = ndimage.binary_erosion(normal.tissue == Tissue.FAT, iterations=2)
    inside = ndimage.binary_erosion(fat, np.ones((1, 5, 5), bool))
    assert inside.sum() > 10_000

    def noise(case: PhantomCase) -> float:
        hu = case.ct.hu.astype(float)
        mean = ndimage.uniform_filter(hu, (1, 5, 5))
        var = ndimage.uniform_filter(hu * hu, (1, 5, 5)) - mean * mean
        return float(np.median(np.sqrt(np.clip(var[inside], 0.0, None))))

    ratio = noise(low) / noise(normal)
    assert 1.8 <= ratio <= 3.2, ratio


# ---------------------------------------------------------------------------------------------------
# 9. variants
# ---------------------------------------------------------------------------------------------------
def test_implant_variant_metal_and_streaks(small):
    case, normal = small("implant"), small()
    assert (case.ct.hu >= 3000).sum() > 50
    assert normal.ct.hu.max() < 3000
    assert case.truth["variants"]["implant_levels"] == ["L4", "L5"]
    assert {n: lv["implant"] for n, lv in case.truth["levels"].items()} == {
        n: n in ("L4", "L5") for n in case.truth["levels"]
    }
    metal = case.tissue == Tissue.METAL
    metal_slices = np.flatnonzero(metal.any(axis=(1, 2)))
    assert metal_slices.size > 5
    sd_implant, sd_normal = [], []
    for k in metal_slices:
        dist = ndimage.distance_transform_edt(~metal[k], sampling=case.ct.spacing[1::-1])
        ring = (dist >= 10.0) & (dist <= 40.0) & np.isin(case.tissue[k], (Tissue.SOFT, Tissue.FAT))
        sd_implant.append(case.ct.hu[k][ring].astype(float))
        sd_normal.append(normal.ct.hu[k][ring].astype(float))
    with_metal = float(np.concatenate(sd_implant).std())
    without_metal = float(np.concatenate(sd_normal).std())  # the same slices of the same patient without screws
    assert with_metal > 1.15 * without_metal, (with_metal, without_metal)


def test_contrast_variant(small):
    case, normal = small("contrast"), small()
    assert case.truth["variants"]["contrast"] is True
    assert case.truth["variants"]["contrast_phase"] == "portal_venous"
    blood = case.truth["scanner"]["blood_hu"]
    assert case.ct.hu[case.tissue == Tissue.BLOOD].mean() > blood + 100.0
    assert normal.ct.hu[normal.tissue == Tissue.BLOOD].mean() < blood + 20.0
    gain = np.mean(
        [case.truth["levels"][n]["trabecular_hu"] - normal.truth["levels"][n]["trabecular_hu"] for n in LEVELS]
    )
    # Pompe et al. 2015: +18.2 HU portal venous at 120 kVp, × the scanner's iodine HU / 26.6, × the bolus (0.9–1.1)
    k = case.truth["scanner"]["iodine_hu_per_mg_ml"] / 26.6
    assert 18.2 * k * 0.9 - 0.05 <= gain <= 18.2 * k * 1.1 + 0.05
    # QCT reference (unenhanced) BMD is unchanged
    assert case.truth["bmd_mg_cm3"] == normal.truth["bmd_mg_cm3"]
    assert spongiosa_mean_hu(case) - spongiosa_mean_hu(normal) == pytest.approx(gain, abs=4.0)


_BODY = {"T12": 12, "L1": 1, "L2": 2, "L3": 3, "L4": 4, "L5": 5}
_ORDER = ("L5", "L4", "L3", "L2", "L1", "T12")


def anterior_posterior_heights(case: PhantomCase, level: str) -> tuple[float, float]:
    """Heights (mm) of a body's anterior and posterior fifth, along the spine axis from the neighbours' centroids,
    in a 12 mm mid-sagittal slab of its label."""
    i = _ORDER.index(level)
    axis = centroid_lps(case, _BODY[_ORDER[i + 1]]) - centroid_lps(case, _BODY[_ORDER[i - 1]])
    axis /= np.linalg.norm(axis)
    zz, yy, xx = np.nonzero(case.labels == _BODY[level])
    p = case.ct.index_to_lps(np.stack([xx, yy, zz], axis=1).astype(float))
    p = p[np.abs(p[:, 0] - p[:, 0].mean()) <= 6.0] - p.mean(axis=0)
    along = p @ axis
    ap = np.cross(axis, [1.0, 0.0, 0.0])
    ap *= np.sign(ap[1]) / np.linalg.norm(ap)  # points posterior
    across = p @ ap
    lo, hi = np.percentile(across, [2, 98])
    band = 0.2 * (hi - lo)
    return float(np.ptp(along[across <= lo + band])), float(np.ptp(along[across >= hi - band]))


def test_fracture_variant_is_an_anterior_wedge(small):
    case, normal = small("fracture"), small()
    level = case.truth["variants"]["fracture"]
    assert level in ("L1", "L2", "L3")
    assert 0.2 <= case.truth["levels"][level]["fracture_wedge"] <= 0.45
    anterior, posterior = anterior_posterior_heights(case, level)
    assert anterior < 0.8 * posterior, (anterior, posterior)
    anterior, posterior = anterior_posterior_heights(normal, level)
    assert anterior > 0.9 * posterior, (anterior, posterior)


def test_scoliosis_variant_moves_the_canal_sideways(small):
    case, normal = small("scoliosis"), small()
    assert case.truth["canal"]["drift_x_mm"] > 4.0
    assert normal.truth["canal"]["drift_x_mm"] < 3.0
    assert abs(case.truth["patient"]["scoliosis_mm"]) >= 5.0


def test_calcification_variant_adds_dense_plaques(small):
    case, normal = small("calcification"), small()

    def dense_outside_spine(c: PhantomCase) -> int:
        return int(((c.tissue == Tissue.CORTICAL) & (c.labels == 0) & (c.ct.hu > 400)).sum())

    assert case.truth["variants"]["calcification"] is True
    assert dense_outside_spine(case) > dense_outside_spine(normal)
    np.testing.assert_array_equal(case.labels, normal.labels)


# ---------------------------------------------------------------------------------------------------
# 10.–11. canal and annotator truth
# ---------------------------------------------------------------------------------------------------
def test_canal_truth_centres_lie_in_the_canal(small_case):
    case = small_case
    canal = case.truth["canal"]
    centres = np.array(canal["centres_lps"])
    assert len(centres) == len(canal["slice_indices"])
    assert len(centres) >= 0.85 * case.ct.shape[0]
    near_canal = ndimage.binary_dilation(np.isin(case.tissue, CANAL_CODES), np.ones((3, 3, 3), bool))
    ijk = np.rint(case.ct.lps_to_index(centres)).astype(int)
    assert np.array_equal(ijk[:, 2], canal["slice_indices"])
    assert near_canal[ijk[:, 2], ijk[:, 1], ijk[:, 0]].all()
    assert canal["sagittal_x_lps"] == pytest.approx(centres[:, 0].mean(), abs=1e-2)


def test_annotation_labels_land_on_the_3d_truth(small_case):
    case = small_case
    assert case.annotation_image.shape == (512, 512)
    assert case.annotation_image.dtype == np.float32
    assert case.annotation_labels.shape == (512, 512)
    assert set(np.unique(case.annotation_labels).tolist()) == {0, 1, 2, 3, 4}
    geom = case.annotation_geometry
    assert geom.n_slices == 1
    canal_column = geom.lps_to_pixel(case.truth["canal"]["mean_centre_lps"])[0]
    rows, cols = [], []
    for level in (1, 2, 3, 4):
        rr, cc = np.nonzero(case.annotation_labels == level)
        rows.append(rr.mean())
        cols.append(cc.mean())
        assert cc.mean() < canal_column  # bodies anterior (left) of the canal
        ijk = np.rint(case.ct.lps_to_index(geom.pixel_to_lps([cc.mean(), rr.mean(), 0.0]))).astype(int)
        i, j, k = ijk
        assert (case.labels[k - 2 : k + 3, j - 2 : j + 3, i - 2 : i + 3] == level).any(), (level, ijk)
    assert rows[0] < rows[1] < rows[2] < rows[3]  # rows run superior → inferior
    assert case.truth["annotation"]["levels_drawn"] == list(LEVELS)


# ---------------------------------------------------------------------------------------------------
# 12. files
# ---------------------------------------------------------------------------------------------------
def test_write_case_files(small_case, tmp_path):
    folder = write_case(small_case, tmp_path)
    assert folder == tmp_path / small_case.case_id
    assert list(tmp_path.iterdir()) == [folder]
    assert {p.name for p in folder.iterdir()} == {
        "ct.nii.gz",
        "vertebrae.nii.gz",
        "truth.json",
        "annotation_image.nii.gz",
        "annotation_labels.nii.gz",
    }

    ct = read_ct(folder / "ct.nii.gz")
    np.testing.assert_array_equal(ct.hu, small_case.ct.hu.astype(np.float32))
    np.testing.assert_allclose(ct.affine, small_case.ct.affine, atol=1e-4)
    assert sitk.ReadImage(str(folder / "ct.nii.gz")).GetPixelID() == sitk.sitkInt16

    labels = sitk.ReadImage(str(folder / "vertebrae.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), small_case.labels)

    geom = small_case.annotation_geometry
    for name, array in (
        ("annotation_image.nii.gz", small_case.annotation_image),
        ("annotation_labels.nii.gz", small_case.annotation_labels),
    ):
        img = sitk.ReadImage(str(folder / name))
        np.testing.assert_allclose(img.GetOrigin(), geom.origin_lps, atol=1e-3)
        np.testing.assert_allclose(np.array(img.GetDirection()), geom.direction.flatten(), atol=1e-6)
        np.testing.assert_allclose(img.GetSpacing(), geom.spacing, atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img)[0], array)

    truth = json.loads((folder / "truth.json").read_text(encoding="utf-8"))
    assert {"bmd_mg_cm3", "mean_bmd_mg_cm3", "category", "vendor", "seed"} <= set(truth)
    assert truth["bmd_mg_cm3"] == small_case.truth["bmd_mg_cm3"]
    assert (truth["vendor"], truth["seed"]) == ("A", SEED)


def test_generate_cohort_writes_and_resumes(tmp_path):
    csv_path = generate_cohort(tmp_path, cases=3, seed=5, vendor="B", size="small", progress=False)
    assert csv_path == tmp_path / "cohort.csv"
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COHORT_COLUMNS
        rows = list(reader)
    assert [r["case"] for r in rows] == ["B_000005", "B_000006", "B_000007"]
    for r in rows:
        truth = json.loads((tmp_path / r["case"] / "truth.json").read_text(encoding="utf-8"))
        assert r["vendor"] == "B" and r["size"] == "small"
        assert float(r["mean_bmd_mg_cm3"]) == pytest.approx(truth["mean_bmd_mg_cm3"])
        assert r["category"] == truth["category"]
    assert {p.name for p in tmp_path.iterdir()} == {"cohort.csv", "B_000005", "B_000006", "B_000007"}

    ct_file = tmp_path / "B_000006" / "ct.nii.gz"
    before = ct_file.stat()
    generate_cohort(tmp_path, cases=3, seed=5, vendor="B", size="small", progress=False)
    after = ct_file.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    with csv_path.open(newline="", encoding="utf-8") as f:
        assert list(csv.DictReader(f)) == rows


# ---------------------------------------------------------------------------------------------------
# 13. bad arguments
# ---------------------------------------------------------------------------------------------------
def test_unknown_vendor_raises_with_choices():
    with pytest.raises(ValueError, match="vendor") as info:
        generate_case(1, "D", "small")
    assert all(v in str(info.value) for v in SCANNERS)


def test_unknown_variant_raises_with_choices():
    with pytest.raises(ValueError, match="variant") as info:
        generate_case(1, "A", "small", "broken-leg")
    assert all(v in str(info.value) for v in VARIANTS)


def test_unknown_size_raises_with_choices():
    with pytest.raises(ValueError, match="size") as info:
        generate_case(1, "A", "medium")
    assert all(s in str(info.value) for s in SIZES)
