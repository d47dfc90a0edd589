"""Robust summary statistics: the median and its standard error.

Table 1 of the paper reports, per image, the median ellipticity ratio of the Br columns with the
standard error (SE) of the median. Two estimators of that SE are offered:

``asymptotic``
    The large-sample SE of the sample median, ``1 / (2 f(m) sqrt(n))``, where ``f(m)`` is the
    probability density at the median ``m``. ``f(m)`` is estimated with a Gaussian kernel density
    evaluated at the median, bandwidth by Silverman's rule with the robust scale
    ``h = 0.9 * min(sd, IQR / 1.349, 1.4826 * MAD) * n^(-1/5)``. For a normal sample this tends to
    ``sqrt(pi/2) * sigma / sqrt(n)``; unlike that normal shortcut it stays valid for skewed
    distributions such as ellipticity ratios, which are bounded below by 1.
``normal``
    The normal shortcut ``sqrt(pi/2) * 1.4826 * MAD / sqrt(n)`` (robust sigma from the MAD).
``bootstrap``
    Standard deviation of the medians of ``n_boot`` resamples (with replacement), seeded.

Non-finite values are dropped before anything is computed.
"""

from __future__ import annotations

import math

import numpy as np

from octastem.io import InputError

#: MAD -> standard deviation for a normal distribution.
MAD_TO_SIGMA = 1.482602218505602
#: IQR -> standard deviation for a normal distribution.
IQR_TO_SIGMA = 1.0 / 1.3489795003921634

SE_METHODS = ("asymptotic", "normal", "bootstrap")


def _finite(values) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    x = x[np.isfinite(x)]
    if x.size < 2:
        raise InputError(f"median_se: need at least 2 finite values, got {x.size}")
    return x


def robust_sigma(values) -> float:
    """Robust standard deviation: the smallest of sd, IQR/1.349 and 1.4826*MAD that is > 0 (0 if none)."""
    x = _finite(values)
    med = np.median(x)
    q75, q25 = np.percentile(x, [75, 25])
    candidates = [np.std(x, ddof=1), (q75 - q25) * IQR_TO_SIGMA, MAD_TO_SIGMA * np.median(np.abs(x - med))]
    positive = [c for c in candidates if c > 0]
    return float(min(positive)) if positive else 0.0


def density_at_median(values) -> float:
    """Gaussian-kernel density estimate at the sample median (Silverman bandwidth, robust scale).

    Returns ``inf`` when all values are equal (the median is then known exactly).
    """
    x = _finite(values)
    n = x.size
    sigma = robust_sigma(x)
    if sigma == 0:
        return math.inf
    h = 0.9 * sigma * n ** (-0.2)
    m = np.median(x)
    u = (x - m) / h
    return float(np.exp(-0.5 * u * u).sum() / (n * h * math.sqrt(2 * math.pi)))


def median_se(values, method: str = "asymptotic", n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Median of the finite ``values`` and its standard error (same units as the values).

    ``method``: ``"asymptotic"`` (1 / (2 f(m) sqrt(n)) with a kernel density at the median),
    ``"normal"`` (sqrt(pi/2) * robust sigma / sqrt(n)) or ``"bootstrap"`` (``n_boot`` seeded
    resamples). Raises :class:`~octastem.io.InputError` for fewer than 2 finite values or an
    unknown method.
    """
    if method not in SE_METHODS:
        raise InputError(f"median_se: method must be one of {SE_METHODS}, got {method!r}")
    x = _finite(values)
    n = x.size
    med = float(np.median(x))
    if method == "asymptotic":
        f = density_at_median(x)
        se = 0.0 if math.isinf(f) else 1.0 / (2.0 * f * math.sqrt(n))
    elif method == "normal":
        se = math.sqrt(math.pi / 2) * MAD_TO_SIGMA * float(np.median(np.abs(x - med))) / math.sqrt(n)
    else:
        if int(n_boot) < 2:
            raise InputError(f"median_se: n_boot must be >= 2, got {n_boot}")
        rng = np.random.default_rng(seed)
        medians = np.empty(int(n_boot))
        # Resample in blocks so memory stays bounded for long inputs.
        block = max(1, 2_000_000 // n)
        for start in range(0, int(n_boot), block):
            stop = min(int(n_boot), start + block)
            idx = rng.integers(0, n, size=(stop - start, n))
            medians[start:stop] = np.median(x[idx], axis=1)
        se = float(np.std(medians, ddof=1))
    return med, float(se)
