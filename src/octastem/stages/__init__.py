"""The stage layer: file in, file out, one function per Snakemake rule, keyword arguments only.

Each stage reads its inputs, calls the library and writes its outputs atomically, so
``workflow/scripts/*.py`` only translate the ``snakemake`` object into one call here and every
stage can be run and tested without Snakemake. One module per rule file of ``workflow/rules/``:

- common: the job's log file (:func:`logged`) and its provenance record;
- structure: ``structure``;
- md: ``md``, ``md_analysis``, ``md_figures``;
- student: ``student_data``, ``train_student``, ``validate_student``;
- potential: ``snapshot_potential``;
- stem: ``simulate_4dstem``, ``simulate_nanocrystal``, ``simulate_like``, ``dose``, ``ingest``, ``average``,
  ``reconstruct``;
- cnn: ``cnn_training_set``, ``train_cnn``, ``evaluate_cnn``, ``evaluate_suite``;
- fit: ``fit`` (rules ``fit_stem`` and ``fit_md``), ``md_statistics``;
- report: ``table1``, ``table1_plot``, ``figure``.
"""

from .cnn import cnn_training_set, evaluate_cnn, evaluate_suite, train_cnn
from .common import logged, run_context
from .fit import fit, md_statistics
from .md import md, md_analysis, md_figures
from .potential import snapshot_potential
from .report import figure, table1, table1_plot
from .stem import average, dose, ingest, reconstruct, simulate_4dstem, simulate_like, simulate_nanocrystal
from .structure import read_structure, structure
from .student import student_data, train_student, validate_student

__all__ = [
    "average",
    "cnn_training_set",
    "dose",
    "evaluate_cnn",
    "evaluate_suite",
    "figure",
    "fit",
    "ingest",
    "logged",
    "md",
    "md_analysis",
    "md_figures",
    "md_statistics",
    "read_structure",
    "reconstruct",
    "run_context",
    "simulate_4dstem",
    "simulate_like",
    "simulate_nanocrystal",
    "snapshot_potential",
    "structure",
    "student_data",
    "table1",
    "table1_plot",
    "train_cnn",
    "train_student",
    "validate_student",
]
