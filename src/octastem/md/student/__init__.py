"""A small, fast MACE "student" distilled from the study's reference potential.

- sampling: short MD sampling runs, strained and rattled copies, labels of the reference
  (extxyz with ``REF_energy`` / ``REF_forces`` / ``REF_stress``) and the train/valid/test split;
- training: :class:`StudentSettings`, the arguments of mace-torch's ``run_train``, the trainer
  and the checkpoints a training round continues from;
- validation: held-out errors, the speed ratio, the MD comparison with the reference and the
  picosecond NPT stability check.

The pipeline runs the three steps as the rules ``student_data``, ``train_student`` and
``validate_student`` (stage functions in :mod:`octastem.stages.student`).
"""

from .sampling import (
    ENERGY_KEY,
    FORCES_KEY,
    NPT_P_TAU_FS,
    NPT_T_TAU_FS,
    STRESS_KEY,
    SampleRun,
    SampleSettings,
    default_runs,
    label,
    read_labelled,
    sample_configurations,
    sample_settings,
    split_frames,
)
from .training import (
    StudentSettings,
    latest_checkpoint,
    model_e0s,
    round_settings,
    run_train_args,
    seed_checkpoint,
    train_student,
)
from .validation import (
    MDCompareSettings,
    NPTCheckSettings,
    compare_md,
    errors,
    machine,
    npt_stability,
    time_force_calls,
    validate_student,
)

__all__ = [
    "ENERGY_KEY",
    "FORCES_KEY",
    "MDCompareSettings",
    "NPTCheckSettings",
    "NPT_P_TAU_FS",
    "NPT_T_TAU_FS",
    "STRESS_KEY",
    "SampleRun",
    "SampleSettings",
    "StudentSettings",
    "compare_md",
    "default_runs",
    "errors",
    "label",
    "latest_checkpoint",
    "machine",
    "model_e0s",
    "npt_stability",
    "read_labelled",
    "round_settings",
    "run_train_args",
    "sample_configurations",
    "sample_settings",
    "seed_checkpoint",
    "split_frames",
    "time_force_calls",
    "train_student",
    "validate_student",
]
