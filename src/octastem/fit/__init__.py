"""Elliptical Gaussian fits of the projected atomic columns of cubic FAPbBr3 viewed along [001].

The image model is that of StatSTEM / De wael et al. (2021): a sum of 2D Gaussians, one centred on
each atomic column, fitted by non-linear least squares. Internally a column is parametrised by
(sigma_x, sigma_y, rho) of its covariance matrix, which is smooth everywhere, including the round
shape (no angle degeneracy at ratio 1, no sigma_x/sigma_y swap); the reported (sigma_major,
sigma_minor, angle) are the eigen-decomposition of that covariance, with ``ellipticity =
sigma_major / sigma_minor >= 1`` and the angle of the major axis from +x in (-90, 90] degrees,
their standard errors propagated from the fit's covariance matrix (delta method).

Modules:

- ``model``: Gaussian model functions and parametrisations, the fit's bounds and window sizes,
  the numerical Jacobian shared by the standard errors and the bounds, :func:`model_image`;
- ``lattice``: the ideal column grid, locating the lattice in an image, initial guesses;
- ``rows``: the result table's columns, quality flags and standard errors of the axes;
- ``window``: engine "window", one lmfit fit per column in its window (the reference);
- ``joint``: engine "joint", one lmfit fit of all columns at once (:func:`fit_joint`);
- ``fast``: engine "fast", batched Levenberg-Marquardt with neighbour subtraction sweeps;
- ``columns``: :func:`fit_columns` (locate the lattice, run an engine of :data:`ENGINES`, finish);
- ``synthetic``: :func:`round_baseline`, the ellipticity that noise alone produces, and
  :func:`noise_bias`, the noise bias of the measured median (parametric bootstrap);
- ``summary``: :func:`summarize`, the per-type summary of a fit;
- ``files``: :func:`fit_image_file`, image file in, table, summary and figure out;
- ``plot``: :func:`plot_model`, the image with the fitted ellipses;
- ``crlb``: Cramér-Rao lower bounds of the fitted parameters (the bounds themselves:
  ``octastem.fit.crlb.crlb``, not re-exported, so that the module keeps its name);
- ``stats``: the median and its standard error.
"""

from octastem.fit.columns import ENGINES, fit_columns
from octastem.fit.crlb import design, fisher_information, pixel_grid
from octastem.fit.files import fit_image_file
from octastem.fit.joint import fit_joint
from octastem.fit.lattice import SITES, TYPES, Lattice, column_grid, locate_lattice, refine_origin
from octastem.fit.model import axes_to_cov, cov_to_axes, elliptical_gaussian, model_image
from octastem.fit.plot import plot_model
from octastem.fit.rows import RESULT_COLUMNS
from octastem.fit.stats import density_at_median, median_se, robust_sigma
from octastem.fit.summary import summarize
from octastem.fit.synthetic import noise_bias, round_baseline

__all__ = [
    "ENGINES",
    "RESULT_COLUMNS",
    "SITES",
    "TYPES",
    "Lattice",
    "axes_to_cov",
    "column_grid",
    "cov_to_axes",
    "density_at_median",
    "design",
    "elliptical_gaussian",
    "fisher_information",
    "fit_columns",
    "fit_image_file",
    "fit_joint",
    "locate_lattice",
    "median_se",
    "model_image",
    "pixel_grid",
    "plot_model",
    "refine_origin",
    "robust_sigma",
    "noise_bias",
    "round_baseline",
    "summarize",
]
