"""4D-STEM: simulated and measured datasets, their template-matching average and phase images.

- simulate: abTEM multislice 4D-STEM of MD frames (periodic cell or finite specimen) and Poisson
  noise at a dose;
- nanocrystal: finite FAPbBr3 nanocrystals cut from MD frames, the specimens of the synthetic
  experiments;
- ingest/: raw 4D-STEM files (HDF5, .npy, EMD, Merlin, EMPAD, other rosettasciio formats) -> the
  internal HDF5 format, streamed, one reader module per format;
- lattice: virtual images, the Fourier lattice search of a crystalline scan, basis reduction and
  the check against the structure model's lattice parameter;
- average: template-matching average of a crystalline scan onto one (super)cell;
- reconstruct: phase images by centre of mass, integrated COM, the CNN of :mod:`octastem.cnn`
  and direct ptychography (SSB, WDD) by quantem, imported only when used.

A dataset in memory is an :class:`octastem.io.Stem4D`, on disk the file of
:func:`octastem.io.write_4dstem`. ``ingest`` and ``reconstruct`` name both a module and its
main function; the package attribute is the function.
"""

from .average import WEIGHTS, CellAccumulator, average_file, average_to_cell
from .ingest import FORMATS, ingest, open_source, resolve_calibration
from .lattice import IMAGES, Lattice, check_lattice, detector_vectors, find_lattice, gauss_reduce, virtual_image
from .nanocrystal import Nanocrystal, build_nanocrystal, fa_molecules
from .reconstruct import (
    METHODS,
    SCAN_GRID_METHODS,
    SamplingWarning,
    center_of_mass,
    check_sampling,
    direct_ptychography,
    fourier_upsample,
    icom,
    icom_transfer,
    icom_wiener,
    integrate_gradient,
    nyquist_step_A,
    reconstruct,
    square_grid,
    square_pixels,
    validate,
)
from .simulate import add_poisson_noise, antialias_sampling_A, electrons_per_position, simulate_4dstem

__all__ = [
    "FORMATS",
    "IMAGES",
    "METHODS",
    "SCAN_GRID_METHODS",
    "SamplingWarning",
    "check_sampling",
    "icom_transfer",
    "icom_wiener",
    "nyquist_step_A",
    "WEIGHTS",
    "CellAccumulator",
    "Lattice",
    "Nanocrystal",
    "add_poisson_noise",
    "antialias_sampling_A",
    "average_file",
    "average_to_cell",
    "build_nanocrystal",
    "center_of_mass",
    "check_lattice",
    "detector_vectors",
    "direct_ptychography",
    "electrons_per_position",
    "fa_molecules",
    "find_lattice",
    "fourier_upsample",
    "gauss_reduce",
    "icom",
    "ingest",
    "integrate_gradient",
    "open_source",
    "reconstruct",
    "resolve_calibration",
    "simulate_4dstem",
    "square_grid",
    "square_pixels",
    "validate",
    "virtual_image",
]
