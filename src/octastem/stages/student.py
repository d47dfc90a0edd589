"""Stages of the student rules: ``student_data``, ``train_student``, ``validate_student``."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from octastem import io

log = logging.getLogger("octastem")


def student_data(
    *, data, summary, reference: str, sampling: dict, trust_model_file: bool, driver=None, threads: int | None = None
) -> None:
    """Sample + label configurations into ``data`` (extxyz) and write a ``summary`` JSON.

    ``reference``: a registry entry or a model file; ``sampling``: one round of ``student.rounds``
    (``runs``: list of :class:`~octastem.md.student.SampleRun` fields, other
    :class:`~octastem.md.student.SampleSettings` fields; its ``epochs`` belong to training);
    ``driver``: a student model that drives the MD (frames then labelled by the reference);
    ``trust_model_file``: unpickle model files whose sha256 is recorded nowhere.
    """
    from octastem.md.student import machine, sample_configurations, sample_settings
    from octastem.registry import resolve

    settings = sample_settings(**{k: v for k, v in sampling.items() if k != "epochs"})
    summ = sample_configurations(
        resolve(reference), data, settings, driver_path=driver, threads=threads, trust=trust_model_file
    )
    summ["machine"] = machine()
    io.write_json(summary, summ)


def train_student(
    *,
    data,
    model,
    split,
    reference: str,
    train: dict,
    valid_fraction: float,
    test_fraction: float,
    split_seed: int,
    trust_model_file: bool,
    warm_start=None,
    epochs: int | None = None,
    threads: int | None = None,
    log_path=None,
) -> None:
    """Split the labelled ``data`` file(s) into ``split/{train,valid,test}.xyz``, train, write ``model``.

    The student uses the reference's E0s; ``train``: :class:`~octastem.md.student.StudentSettings`
    fields (the rest from ``student.train`` of the schema). The mace-torch working folder is
    ``<model stem>_training`` next to ``model`` (checkpoints there let an interrupted training
    resume). ``warm_start``: the model file of the previous round; training then continues from
    that round's last checkpoint for ``epochs`` more epochs on the grown data set.
    """
    from octastem.md.student import StudentSettings, model_e0s, round_settings, split_frames
    from octastem.md.student import train_student as train_model
    from octastem.registry import resolve

    split = Path(split)
    split.mkdir(parents=True, exist_ok=True)
    train_xyz, valid_xyz, test_xyz = (split / f"{k}.xyz" for k in ("train", "valid", "test"))
    split_frames(data, train_xyz, valid_xyz, test_xyz, valid_fraction, test_fraction, seed=split_seed)
    model = Path(model)
    work = model.parent / (model.stem + "_training")
    settings = round_settings(StudentSettings(**train), work, model.stem, warm_start=warm_start, epochs=epochs)
    trained = train_model(
        train_xyz,
        valid_xyz,
        work,
        settings,
        e0s=model_e0s(resolve(reference), trust=trust_model_file),
        name=model.stem,
        threads=threads,
        log_path=log_path,
    )
    with io.atomic_path(model) as tmp:
        shutil.copyfile(trained, tmp)


def validate_student(
    *,
    model,
    split,
    validation,
    reference: str,
    md: dict | None,
    npt: dict | None,
    trust_model_file: bool,
    md_dir=None,
    threads: int | None = None,
    n_timing_calls: int = 5,
) -> None:
    """Held-out errors on ``split/test.xyz`` and the speed ratio; with ``md`` (compare_md settings)
    the MD comparison, with ``npt`` (npt_stability settings) the picosecond NPT stability check;
    all as the JSON ``validation``. MD trajectories go to ``md_dir`` (default: ``md_compare`` next
    to ``validation``), the NPT check's to its ``npt_stability`` subfolder."""
    from octastem.md.student import compare_md, machine, npt_stability
    from octastem.md.student import validate_student as validate_model
    from octastem.registry import resolve

    ref = resolve(reference)
    test_xyz = Path(split) / "test.xyz"
    md_dir = Path(md_dir) if md_dir is not None else Path(validation).parent / "md_compare"
    trust = trust_model_file
    result = validate_model(model, ref, test_xyz, threads=threads, n_timing_calls=n_timing_calls, trust=trust)
    if md is not None:
        result["md"] = compare_md(model, ref, md_dir, threads=threads, trust=trust, **md)
    if npt is not None:
        npt_dir = md_dir / "npt_stability"
        result["npt_stability"] = npt_stability(model, ref, npt_dir, threads=threads, trust=trust, **npt)
    result["machine"] = machine()
    io.write_json(validation, result)
