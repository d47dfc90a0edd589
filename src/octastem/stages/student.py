"""Stages of the student rules: ``student_data``, ``train_student``, ``validate_student``.

A model file is a pickle, and unpickling runs code from it. The round models these rules train
(``results/student/student_r<k>.model``) are therefore written with a sha256 record beside them
(``<model>.sha256``, ``sha256sum`` format), and a round model is handed on to the next rule only
when its bytes match that record; every other model file (``student.reference`` given as a path)
must match a record of :func:`octastem.md.mlp.recorded_model_sha256`. ``student.trust_model_file``
(default false) lets a file matching no record be unpickled anyway.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from octastem import io
from octastem.io import InputError

log = logging.getLogger("octastem")

#: The config key that lets a model file matching no record be unpickled.
TRUST_KEY = "student.trust_model_file"


def sha256_record(model: str | os.PathLike) -> Path:
    """The sha256 record written beside a round model: ``<model>.sha256``."""
    model = Path(model)
    return model.with_name(model.name + ".sha256")


def write_sha256_record(model: str | os.PathLike) -> Path:
    """Write ``<model>.sha256`` (``sha256sum`` format: hex digest, two spaces, file name); return its path."""
    model = Path(model)
    record = sha256_record(model)
    io.write_text(record, f"{io.sha256_file(model)}  {model.name}\n")
    return record


def _recorded(path: Path, known: dict[str, str]) -> str | None:
    """Where the sha256 of model file ``path`` is recorded (its own ``.sha256`` record, the registry,
    resources/student/), or None."""
    sha = io.sha256_file(path)
    record = sha256_record(path)
    if record.is_file():
        fields = record.read_text().split()
        if fields and fields[0].lower() == sha:
            return str(record)
        log.warning("%s: sha256 %s differs from its record %s (%s)", path, sha, record, fields[:1])
    return known.get(sha)


def model_trust(paths, trust_model_file: bool) -> bool:
    """Whether every model file in ``paths`` may be unpickled: each matches a sha256 record, or
    ``trust_model_file`` is set. False leaves the check (and its error naming the file and
    ``student.trust_model_file``) to the loader."""
    if trust_model_file:
        return True
    from octastem.md.mlp import recorded_model_sha256

    known = recorded_model_sha256()
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: model file not found")
        where = _recorded(path, known)
        if where is None:
            log.info("%s: sha256 matches no record; %s is false, so it will not be unpickled", path, TRUST_KEY)
            return False
        log.info("%s: sha256 matches %s", path, where)
    return True


def student_data(
    *, data, summary, reference: str, sampling: dict, trust_model_file: bool, driver=None, threads: int | None = None
) -> None:
    """Sample + label configurations into ``data`` (extxyz) and write a ``summary`` JSON.

    ``reference``: a registry entry or a model file; ``sampling``: one round of ``student.rounds``
    (``runs``: list of :class:`~octastem.md.student.SampleRun` fields, other
    :class:`~octastem.md.student.SampleSettings` fields; its ``epochs`` belong to training);
    ``driver``: a student model that drives the MD (frames then labelled by the reference), verified
    by its ``.sha256`` record; ``trust_model_file``: unpickle model files whose sha256 is recorded nowhere.
    """
    from octastem.md.student import machine, sample_configurations, sample_settings
    from octastem.registry import resolve

    settings = sample_settings(**{k: v for k, v in sampling.items() if k != "epochs"})
    ref = resolve(reference)
    trust = model_trust([ref] + ([driver] if driver else []), trust_model_file)
    summ = sample_configurations(ref, data, settings, driver_path=driver, threads=threads, trust=trust)
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
    fields (the rest from ``student.train`` of the schema). ``model`` is written with its sha256
    record ``<model>.sha256`` (:func:`write_sha256_record`), which the later rules check. The mace-torch
    working folder is
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
    ref = resolve(reference)
    trained = train_model(
        train_xyz,
        valid_xyz,
        work,
        settings,
        e0s=model_e0s(ref, trust=model_trust([ref], trust_model_file)),
        name=model.stem,
        threads=threads,
        log_path=log_path,
    )
    record = sha256_record(model)
    record.unlink(missing_ok=True)  # a model and a stale record are never both in place
    with io.atomic_path(model) as tmp:
        shutil.copyfile(trained, tmp)
    write_sha256_record(model)


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
    trust = model_trust([model, ref], trust_model_file)
    result = validate_model(model, ref, test_xyz, threads=threads, n_timing_calls=n_timing_calls, trust=trust)
    if md is not None:
        result["md"] = compare_md(model, ref, md_dir, threads=threads, trust=trust, **md)
    if npt is not None:
        npt_dir = md_dir / "npt_stability"
        result["npt_stability"] = npt_stability(model, ref, npt_dir, threads=threads, trust=trust, **npt)
    result["machine"] = machine()
    io.write_json(validation, result)
