"""Metrics against scikit-learn and hand-worked cases; threshold choice; the patient bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from breast_cancer_detection.metrics import (
    bootstrap_ci,
    bootstrap_metrics,
    brier_score,
    choose_threshold,
    confusion,
    evaluate_predictions,
    expected_calibration_error,
    image_metrics,
    metrics_by,
    patient_metrics,
    patient_recognition_rate,
    patient_table,
    pr_auc,
    reliability_curve,
    roc_auc,
    scalar_metrics,
)


@pytest.fixture
def scores():
    """Noisy but informative scores with ties, 300 images."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.35 * y + rng.normal(0.35, 0.2, 300), 0, 1).round(2)  # rounding makes ties
    return y, p


# ----------------------------------------------------------------------------- image level


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.62])
def test_image_metrics_match_scikit_learn(scores, threshold):
    y, p = scores
    m = image_metrics(y, p, threshold)
    pred = (p >= threshold).astype(int)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=[0, 1]).tolist()
    assert m["images"] == 300 and m["malignant"] == int(y.sum())


def test_auc_and_average_precision_match_scikit_learn_with_heavy_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 40)
        if len(set(y)) < 2:
            continue
        p = rng.integers(0, 4, 40) / 4  # only five distinct values
        assert roc_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p))
        assert pr_auc(y, p) == pytest.approx(skm.average_precision_score(y, p))


def test_image_metrics_on_a_hand_worked_case():
    # benign .1 (TN), .6 (FP); malignant .7 (TP), .4 (FN), .9 (TP)
    m = image_metrics([0, 0, 1, 1, 1], [0.1, 0.6, 0.7, 0.4, 0.9], 0.5)
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # malignant/benign pairs ranked right: .7>.1,.6; .4>.1 only; .9>both -> 5 of 6
    assert m["roc_auc"] == pytest.approx(5 / 6)
    # The threshold is inclusive: p == threshold is malignant.
    assert image_metrics([1], [0.5], 0.5)["sensitivity"] == 1.0


def test_undefined_metrics_are_nan_not_zero():
    only_malignant = image_metrics([1, 1, 1], [0.2, 0.7, 0.9], 0.5)
    assert math.isnan(only_malignant["specificity"]) and math.isnan(only_malignant["roc_auc"])
    assert only_malignant["sensitivity"] == pytest.approx(2 / 3)
    only_benign = image_metrics([0, 0], [0.2, 0.7], 0.5)
    assert math.isnan(only_benign["sensitivity"]) and math.isnan(only_benign["pr_auc"])
    assert only_benign["f1"] == 0.0  # one false positive, no true one
    assert math.isnan(image_metrics([0], [0.1], 0.5)["f1"])  # no positives at all
    assert confusion([], []) == [[0, 0], [0, 0]]


# ----------------------------------------------------------------------------- patient level

# A worked example of Spanhol et al.'s patient recognition rate, at threshold 0.5:
#   patient A, benign, 4 images, p = .1 .2 .3 .7 -> predicted 0 0 0 1 -> 3/4 right = 0.75
#   patient B, malignant, 2 images, p = .8 .3    -> predicted 1 0     -> 1/2 right = 0.50
#   patient C, malignant, 4 images, p = .9 .6 .7 .8 -> all 1          -> 4/4 right = 1.00
#   recognition rate = (0.75 + 0.50 + 1.00) / 3 = 0.75, while image accuracy = 8/10 = 0.80
#   mean p per patient: A .325, B .55, C .75
WORKED = pd.DataFrame({
    "patient": list("AAAABBCCCC"),
    "target": [0, 0, 0, 0, 1, 1, 1, 1, 1, 1],
    "probability": [0.1, 0.2, 0.3, 0.7, 0.8, 0.3, 0.9, 0.6, 0.7, 0.8],
})


def test_patient_recognition_rate_worked_example():
    y, p, pid = WORKED["target"], WORKED["probability"], WORKED["patient"]
    assert patient_recognition_rate(y, p >= 0.5, pid) == pytest.approx(0.75)
    assert image_metrics(y, p, 0.5)["accuracy"] == pytest.approx(0.80)
    per = patient_table(y, p, pid, 0.5)
    assert per.index.tolist() == ["A", "B", "C"]
    assert per["images"].tolist() == [4, 2, 4] and per["target"].tolist() == [0, 1, 1]
    np.testing.assert_allclose(per["mean_probability"], [0.325, 0.55, 0.75])
    np.testing.assert_allclose(per["image_accuracy"], [0.75, 0.5, 1.0])


def test_patient_level_decision_from_mean_probability():
    y, p, pid = WORKED["target"], WORKED["probability"], WORKED["patient"]
    m = patient_metrics(y, p, pid, 0.5)
    assert m["patients"] == 3 and m["malignant_patients"] == 2
    assert m["recognition_rate"] == pytest.approx(0.75)
    assert m["accuracy"] == 1.0 and m["roc_auc"] == 1.0
    assert m["confusion_matrix"] == [[1, 0], [0, 2]]
    # At 0.6 patient B (mean .55) is called benign: 2 of 3 patients right.
    m = patient_metrics(y, p, pid, 0.6)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["sensitivity"] == pytest.approx(0.5)
    assert m["confusion_matrix"] == [[1, 0], [1, 1]]
    # The recognition rate is unchanged: no image probability lies in [.5, .6).
    assert m["recognition_rate"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)


def test_evaluate_predictions_without_patient_ids_says_so():
    df = WORKED.assign(patient="")
    out = evaluate_predictions(df, 0.5)
    assert out["patient"] == {"note": "no patient ids"}
    assert out["image"]["accuracy"] == pytest.approx(0.8)
    assert "patient.recognition_rate" not in scalar_metrics(out)
    assert evaluate_predictions(WORKED, 0.5)["patient"]["recognition_rate"] == pytest.approx(0.75)


def test_metrics_by_sorts_magnifications_by_number_and_skips_empty():
    df = pd.concat([WORKED.assign(magnification=m) for m in ("400X", "40X", "100X", "")])
    by = metrics_by(df, "magnification", 0.5)
    assert list(by) == ["40X", "100X", "400X"]
    assert by["100X"]["image"]["images"] == 10
    assert by["40X"]["patient"]["recognition_rate"] == pytest.approx(0.75)
    assert metrics_by(df, "no_such_column") == {}


def test_scalar_metrics_flattens_numbers_and_drops_counts():
    flat = scalar_metrics(evaluate_predictions(WORKED, 0.5))
    assert flat["image.accuracy"] == pytest.approx(0.8)
    assert flat["patient.recognition_rate"] == pytest.approx(0.75)
    assert "calibration.ece" in flat and "calibration.brier" in flat
    assert not {"image.images", "image.threshold", "patient.patients", "calibration.bins"} & set(
        flat)
    assert not any("confusion" in k or "reliability" in k for k in flat)


# ----------------------------------------------------------------------------- calibration


def test_ece_on_a_hand_worked_case():
    # bins [0,.1]: p .05, y 0 -> gap .05; (.1,.2]: p .15 .15, y 0 1 -> gap .35; (.9,1]: .95, 1
    y, p = [0, 0, 1, 1], [0.05, 0.15, 0.15, 0.95]
    assert expected_calibration_error(y, p) == pytest.approx((0.05 + 2 * 0.35 + 0.05) / 4)
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0
    assert expected_calibration_error([1, 0], [0.0, 1.0]) == pytest.approx(1.0)


def test_reliability_curve_matches_scikit_learn_including_bin_edges(scores):
    y, p = scores
    p = np.r_[p, 0.0, 0.1, 0.5, 1.0]  # values on bin edges
    y = np.r_[y, 0, 1, 0, 1]
    curve = reliability_curve(y, p, bins=10)
    frac, mean_p = calibration_curve(y, p, n_bins=10, strategy="uniform")
    filled = np.asarray(curve["count"]) > 0
    np.testing.assert_allclose(np.asarray(curve["fraction_malignant"])[filled], frac)
    np.testing.assert_allclose(np.asarray(curve["mean_predicted"])[filled], mean_p)
    assert sum(curve["count"]) == len(y) and len(curve["bin_lower"]) == 10
    gaps = np.abs(np.asarray(curve["fraction_malignant"]) - curve["mean_predicted"])[filled]
    weights = np.asarray(curve["count"])[filled] / len(y)
    assert expected_calibration_error(y, p) == pytest.approx(np.sum(weights * gaps))


def test_brier_score_matches_scikit_learn(scores):
    y, p = scores
    assert brier_score(y, p) == pytest.approx(skm.brier_score_loss(y, p))
    assert math.isnan(brier_score([], []))


# ----------------------------------------------------------------------------- threshold

# Benign .05 .1 .2 .6 .62, malignant .45 .7 .8 .85 .9. Youden's J over the possible cuts:
#   cut in (.62, .7]: sensitivity 4/5, specificity 5/5 -> J = .8   (the unique best)
#   cut in (.2, .45]: sensitivity 5/5, specificity 3/5 -> J = .6
CUT_Y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
CUT_P = np.array([0.05, 0.1, 0.2, 0.6, 0.62, 0.45, 0.7, 0.8, 0.85, 0.9])


def _youden(y, p, t):
    m = image_metrics(y, p, t)
    return m["sensitivity"] + m["specificity"] - 1


def test_youden_picks_the_known_best_cut():
    t = choose_threshold(CUT_Y, CUT_P)
    assert t == pytest.approx(0.66)  # halfway between .62 and .7
    m = image_metrics(CUT_Y, CUT_P, t)
    assert m["sensitivity"] == pytest.approx(0.8) and m["specificity"] == 1.0
    grid = np.linspace(0, 1, 1001)
    assert _youden(CUT_Y, CUT_P, t) == pytest.approx(max(_youden(CUT_Y, CUT_P, g) for g in grid))


def test_youden_matches_a_brute_force_search(scores):
    y, p = scores
    t = choose_threshold(y, p)
    best = max(_youden(y, p, g) for g in np.unique(p))
    assert _youden(y, p, t) == pytest.approx(best)


def test_youden_ties_go_to_the_highest_cut():
    # J = 1/3 at the cuts 0.9, 0.6 and 0.2; in floating point the last one comes out a hair
    # larger (0.33333333333333337), which must not decide.
    y, p = [1, 1, 1, 0, 0, 0], [0.9, 0.6, 0.2, 0.7, 0.3, 0.1]
    t = choose_threshold(y, p)
    assert t == pytest.approx((0.9 + 0.7) / 2)
    assert image_metrics(y, p, t)["specificity"] == 1.0


def test_target_sensitivity_is_reached_with_the_highest_cut(scores):
    t = choose_threshold(CUT_Y, CUT_P, "target_sensitivity", target_sensitivity=0.95)
    assert t == pytest.approx((0.2 + 0.45) / 2)
    y, p = scores
    for target in (0.8, 0.9, 0.95, 1.0):
        t = choose_threshold(y, p, "target_sensitivity", target_sensitivity=target)
        assert image_metrics(y, p, t)["sensitivity"] >= target
        higher = np.unique(p[p >= t])[1:]  # any cut above the next distinct probability...
        if len(higher):
            assert image_metrics(y, p, higher[0])["sensitivity"] < target  # ...misses it


def test_choose_threshold_refuses_bad_input():
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold([1, 1], [0.2, 0.9])
    with pytest.raises(ValueError, match="method"):
        choose_threshold(CUT_Y, CUT_P, "f1")
    with pytest.raises(ValueError, match="target_sensitivity"):
        choose_threshold(CUT_Y, CUT_P, "target_sensitivity", target_sensitivity=1.5)


# ----------------------------------------------------------------------------- bootstrap


def _cohort(n_patients: int, seed: int = 0, images: int = 8) -> pd.DataFrame:
    """Patients whose images are mostly all right or all wrong together (as in real data)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n_patients):
        target = k % 2
        hard = rng.random() < 0.3  # a hard patient: the model leans the wrong way on it
        centre = (0.35 if target else 0.65) if hard else (0.8 if target else 0.2)
        for p in np.clip(rng.normal(centre, 0.1, images), 0, 1):
            rows.append({"patient": f"P{k:03d}", "target": target, "probability": p})
    return pd.DataFrame(rows)


def _acc(d: pd.DataFrame) -> float:
    return image_metrics(d["target"], d["probability"], 0.5)["accuracy"]


def test_pooled_out_of_fold_metrics_decide_each_row_at_its_folds_threshold():
    from breast_cancer_detection.metrics import pooled_metrics

    df = pd.DataFrame({
        "patient": ["a", "a", "b", "b", "c", "d"],
        "target": [1, 1, 0, 0, 1, 0],
        "probability": [0.6, 0.2, 0.3, 0.5, 0.45, 0.1],
        "threshold": [0.5, 0.5, 0.5, 0.5, 0.4, 0.4],  # c and d come from a fold at 0.4
    })
    m = pooled_metrics(df)
    # Images right: 0.6>=0.5 yes, 0.2 no, 0.3 yes, 0.5 no (benign called malignant), 0.45>=0.4
    # yes, 0.1 yes: 4 of 6. At one shared threshold of 0.5, c would be wrong (3 of 6).
    assert m["image_accuracy"] == pytest.approx(4 / 6)
    # Patients by mean: a 0.4 < 0.5 wrong; b 0.4 < 0.5 right; c 0.45 >= 0.4 right; d right.
    assert m["patient_accuracy"] == pytest.approx(3 / 4)
    assert (m["images"], m["patients"]) == (6, 4)
    assert m["image_roc_auc"] == pytest.approx(skm.roc_auc_score(df["target"], df["probability"]))
    # Patients ranked by mean P: malignant a 0.4, c 0.45; benign b 0.4, d 0.1 -> 3.5 of 4 pairs.
    assert m["patient_roc_auc"] == pytest.approx(3.5 / 4)


def test_bootstrap_is_reproducible_for_a_seed():
    df = _cohort(30)
    a = bootstrap_ci(df, _acc, n=200, seed=7)
    assert a == bootstrap_ci(df, _acc, n=200, seed=7)
    assert a != bootstrap_ci(df, _acc, n=200, seed=8)
    low, high = a
    assert low < _acc(df) < high


def test_bootstrap_interval_is_the_central_95_percent_of_the_resamples():
    # A metric that ignores its resample and counts calls: the resampled values are exactly
    # 0..999, so the interval is their 2.5th and 97.5th percentiles (a 90% one is 49.95, 949.05).
    calls = iter(range(1000))
    low, high = bootstrap_ci(_cohort(10), lambda d: float(next(calls)), n=1000, seed=0)
    assert (low, high) == pytest.approx((24.975, 974.025))
    # On a real statistic: the mean of 400 normal draws, one row per unit, has a standard
    # error of 1/20, so a 95% interval is about 2 x 1.96 / 20 = 0.196 wide (90%: 0.164).
    values = pd.DataFrame({"x": np.random.default_rng(1).normal(0, 1, 400)})
    low, high = bootstrap_ci(values, lambda d: float(d["x"].mean()), n=2000, seed=0, group=None)
    sd = values["x"].std() / np.sqrt(len(values))
    assert (high - low) / (2 * 1.959964 * sd) == pytest.approx(1.0, abs=0.06)


def test_bootstrap_ci_narrows_with_more_patients():
    small = bootstrap_ci(_cohort(20), _acc, n=300, seed=0)
    large = bootstrap_ci(_cohort(200), _acc, n=300, seed=0)
    assert (large[1] - large[0]) < 0.6 * (small[1] - small[0])


def test_bootstrap_resamples_patients_not_images():
    df = _cohort(30)
    by_patient = bootstrap_ci(df, _acc, n=300, seed=0)
    by_image = bootstrap_ci(df, _acc, n=300, seed=0, group=None)
    # Images of one patient are right or wrong together, so resampling images pretends to
    # have 8x the independent evidence and gives a much narrower interval.
    assert (by_image[1] - by_image[0]) < 0.6 * (by_patient[1] - by_patient[0])
    # Every resample holds as many patients as the data (one drawn twice counts twice), and
    # whole patients: each resample's image count is a sum of 8s.
    sizes = bootstrap_metrics(df, lambda d: {"patients": d["patient"].nunique(),
                                             "whole": float(len(d) % 8 == 0)}, n=50)
    assert sizes["patients"] == (30, 30) and sizes["whole"] == (1.0, 1.0)


def test_bootstrap_without_patient_ids_resamples_images_and_keeps_ids_empty():
    df = _cohort(10).assign(patient="")
    seen = bootstrap_metrics(df, lambda d: {"empty": float(d["patient"].eq("").all()),
                                            "rows": len(d)}, n=20)
    assert seen["empty"] == (1.0, 1.0) and seen["rows"] == (80, 80)
    low, high = bootstrap_ci(df, _acc, n=200)
    assert low <= _acc(df) <= high and high - low > 0


def test_bootstrap_reports_nan_for_a_mostly_undefined_metric():
    df = _cohort(10)
    assert all(math.isnan(v) for v in bootstrap_ci(df, lambda d: float("nan"), n=20))
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci(df, _acc, n=0)


@pytest.mark.parametrize("nan_share, defined", [(0.7, False), (0.5, False), (0.3, True)])
def test_bootstrap_interval_needs_the_metric_in_most_resamples(nan_share, defined):
    # NaN in half of the resamples or more gives (nan, nan); in fewer, an interval of the rest.
    calls = iter(range(1000))

    def sometimes(d):
        k = next(calls)
        return {"m": float("nan") if k % 10 < 10 * nan_share else float(k % 10)}

    low, high = bootstrap_metrics(_cohort(10), sometimes, n=20)["m"]
    assert (math.isfinite(low) and math.isfinite(high) and low <= high) is defined
    assert math.isnan(low) is not defined


@pytest.mark.parametrize("fn", [
    lambda y, p: image_metrics(y, p), lambda y, p: expected_calibration_error(y, p),
    lambda y, p: brier_score(y, p), lambda y, p: patient_metrics(y, p, ["a", "a", "b", "b"])])
def test_non_finite_probabilities_are_refused_not_counted_one_way_or_another(fn):
    with pytest.raises(ValueError, match="1 of the 4 probabilities are not finite"):
        fn([0, 1, 0, 1], [0.1, float("nan"), 0.2, 0.9])
