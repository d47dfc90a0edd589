"""Molecular dynamics of the perovskite cells with machine-learning potentials.

- run: NPT MD (LangevinBAOAB, anisotropic cell) written as a resumable HDF5 trajectory, and its reader;
- mlp: the potentials: load a MACE model on any device, check its elements, make ASE calculators;
- analysis: frame analysis: Pb-Br-Pb angles, Br displacements, lattice parameters, plots;
- student/: distillation of the small, fast student MACE from the reference potential
  (sampling, training, validation).
"""

from . import student
from .analysis import (
    BrGeometry,
    analyse_frames,
    br_geometry,
    plot_analysis,
    plot_vacancy_series,
    time_averaged_structure,
)
from .mlp import check_elements, cueq_available, load_mace_model, mace_calculator, model_elements
from .run import partial_path, read_frames, run_npt, spread

__all__ = [
    "BrGeometry",
    "analyse_frames",
    "br_geometry",
    "check_elements",
    "cueq_available",
    "load_mace_model",
    "mace_calculator",
    "model_elements",
    "partial_path",
    "plot_analysis",
    "plot_vacancy_series",
    "read_frames",
    "run_npt",
    "spread",
    "student",
    "time_averaged_structure",
]
