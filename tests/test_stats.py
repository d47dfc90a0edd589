"""Median and standard error of the median (octastem.fit.stats)."""

import math

import numpy as np
import pytest

from octastem.fit import density_at_median, median_se
from octastem.io import InputError


def test_median_value_and_nan_dropped():
    med, se = median_se([1.0, 3.0, np.nan, 2.0, np.inf])
    assert med == 2.0
    assert se > 0


def test_asymptotic_and_bootstrap_agree_for_normal_sample():
    x = np.random.default_rng(1).normal(1.2, 0.05, 400)
    m1, se_a = median_se(x, "asymptotic")
    m2, se_b = median_se(x, "bootstrap", n_boot=2000, seed=3)
    assert m1 == m2
    assert abs(se_a / se_b - 1) < 0.3


def test_large_sample_matches_normal_theory():
    sigma, n = 0.1, 20000
    x = np.random.default_rng(2).normal(1.1, sigma, n)
    theory = math.sqrt(math.pi / 2) * sigma / math.sqrt(n)
    for method in ("asymptotic", "normal"):
        _, se = median_se(x, method)
        assert abs(se / theory - 1) < 0.08, method
    _, se_b = median_se(x, "bootstrap", n_boot=300, seed=0)
    assert abs(se_b / theory - 1) < 0.2


def test_se_matches_spread_of_medians_for_skewed_data():
    # Ratios are >= 1 and skewed: check against the Monte Carlo spread of medians.
    rng = np.random.default_rng(4)
    samples = 1.0 + rng.gamma(2.0, 0.05, size=(1500, 151))
    empirical = np.median(samples, axis=1).std(ddof=1)
    se = np.median([median_se(s, "asymptotic")[1] for s in samples[:200]])
    assert abs(se / empirical - 1) < 0.15


def test_bootstrap_is_seeded():
    x = np.random.default_rng(5).normal(size=50)
    assert median_se(x, "bootstrap", seed=7) == median_se(x, "bootstrap", seed=7)
    assert median_se(x, "bootstrap", seed=7)[1] != median_se(x, "bootstrap", seed=8)[1]


def test_constant_values_have_zero_se():
    assert median_se([1.2, 1.2, 1.2]) == (1.2, 0.0)
    assert math.isinf(density_at_median([2.0, 2.0]))


@pytest.mark.parametrize("values", [[], [1.0], [np.nan, 1.0, np.inf]])
def test_too_few_values(values):
    with pytest.raises(InputError, match="at least 2 finite"):
        median_se(values)


def test_unknown_method():
    with pytest.raises(InputError, match="method"):
        median_se([1.0, 2.0], method="jackknife")
