"""Diagnostic statistics against scikit-learn, a published DeLong example and the study protocol."""

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score

from ovcf.eval import metrics as M

# Hanley & McNeil (Radiology 1983;148:839) CT ratings, 1 (definitely normal) .. 5 (definitely
# abnormal): 58 normal and 51 abnormal patients. Stata's manual ([R] roctab, first example, whose
# default standard error is DeLong's) reports area 0.8932, SE 0.0307, 95% CI 0.83295 to 0.95339.
HANLEY_NORMAL = np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2])
HANLEY_ABNORMAL = np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])


def hanley():
    labels = np.r_[np.zeros(len(HANLEY_NORMAL)), np.ones(len(HANLEY_ABNORMAL))].astype(int)
    return labels, np.r_[HANLEY_NORMAL, HANLEY_ABNORMAL].astype(float)


def test_delong_matches_published_example():
    d = M.delong_auc(*hanley())
    assert round(d["auc"], 4) == 0.8932
    assert round(d["se"], 4) == 0.0307
    assert round(d["low"], 3) == 0.833 and round(d["high"], 3) == 0.953


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_confusion_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = rng.integers(10, 200)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = np.round(rng.random(n) + 0.4 * y, 1)  # rounding makes ties
    assert M.delong_auc(y, s)["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    t = float(rng.choice(s))
    c = M.confusion(y, s, t)
    tn, fp, fn, tp = confusion_matrix(y, (s >= t).astype(int), labels=[0, 1]).ravel()
    assert (c["tn"], c["fp"], c["fn"], c["tp"]) == (tn, fp, fn, tp)


def test_edge_cases():
    y = np.array([0, 0, 1, 1])
    assert M.delong_auc(y, [0.1, 0.2, 0.8, 0.9])["auc"] == 1.0  # perfect separation
    assert M.delong_auc(y, [0.9, 0.8, 0.2, 0.1])["auc"] == 0.0
    assert M.delong_auc(y, [0.5, 0.5, 0.5, 0.5])["auc"] == 0.5  # all tied
    with pytest.raises(ValueError, match="both classes: all 4 rows are acute"):
        M.delong_auc([1, 1, 1, 1], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="same length"):
        M.delong_auc([0, 1], [0.5])
    with pytest.raises(ValueError, match="NaN"):
        M.delong_auc([0, 1], [0.5, np.nan])
    r = M.rates(M.confusion([0, 0], [0.1, 0.2], 0.5))  # no acute row: sensitivity and PPV undefined
    assert np.isnan(r["sensitivity"]) and np.isnan(r["ppv"]) and r["specificity"] == 1.0


def test_wilson_known_values():
    # Newcombe (Stat Med 1998;17:857), Table I: 81/263 -> 0.2553 to 0.3662; 0/10 -> 0 to 0.2775
    assert np.round(M.wilson(81, 263), 4).tolist() == [0.2553, 0.3662]
    low, high = M.wilson(0, 10)
    assert low == 0.0 and round(high, 4) == 0.2775
    assert np.isnan(M.wilson(0, 0)[0])


def test_delong_paired_test():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 150)
    good = y + rng.normal(0, 0.6, 150)
    weak = y + rng.normal(0, 2.0, 150)
    t = M.delong_test(y, good, weak)
    assert t["auc_a"] > t["auc_b"] and t["p"] < 0.01
    same = M.delong_test(y, good, good)
    assert same["difference"] == 0.0 and same["p"] == 1.0
    # the paired test's variance for a vs a constant model equals a's own DeLong variance
    flat = M.delong_test(y, good, np.zeros(150))
    assert abs(flat["z"]) == pytest.approx((M.delong_auc(y, good)["auc"] - 0.5) / M.delong_auc(y, good)["se"])


def test_thresholds():
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])
    assert M.youden_threshold(y, s) == 0.7  # sens 2/3, spec 1 (J 0.667) beats 0.4 (sens 1, spec 2/3, a tie -> higher)
    assert M.sensitivity_threshold(y, s, 1.0) == 0.4
    assert M.sensitivity_threshold(y, s, 0.6) == 0.7
    assert M.choose_threshold(y, s, "fixed") == 0.5
    with pytest.raises(ValueError, match="unknown threshold rule"):
        M.choose_threshold(y, s, "median")


def test_diagnostic_metrics_and_bootstrap():
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(40), 2)
    y = np.repeat(rng.integers(0, 2, 40), 2)
    s = np.clip(0.5 * y + rng.normal(0.25, 0.25, 80), 0, 1)
    m = M.diagnostic_metrics(y, s, 0.5)
    c = m["confusion"]
    assert sum(c.values()) == 80 and m["sensitivity"]["k"] == c["tp"]
    for name in ("auc", *M.RATES):
        assert m[name]["low"] <= m[name]["value"] <= m[name]["high"]
    b = M.diagnostic_metrics(y, s, 0.5, groups=patients, ci="bootstrap", n_boot=300, seed=0)
    assert b["sensitivity"]["value"] == m["sensitivity"]["value"]
    assert b["auc"]["low"] <= b["auc"]["value"] <= b["auc"]["high"]
    again = M.diagnostic_metrics(y, s, 0.5, groups=patients, ci="bootstrap", n_boot=300, seed=0)
    assert again == b  # seeded
    with pytest.raises(ValueError, match="needs groups"):
        M.diagnostic_metrics(y, s, 0.5, ci="bootstrap")


def test_buderer_reproduces_protocol():
    n = M.buderer_sample_size(sensitivity=0.9, error=0.05, alpha=0.05, prevalence=0.5)
    assert (n["acute"], n["chronic"], n["total"]) == (138, 138, 276)
    assert (n["conservative"]["acute"], n["conservative"]["total"]) == (139, 278)
    assert M.achieved_half_width(0.9, 138) == pytest.approx(0.05, abs=5e-4)
    with pytest.raises(ValueError, match="prevalence"):
        M.buderer_sample_size(prevalence=1.0)
