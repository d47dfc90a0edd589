"""Training of the student: its settings, the mace-torch trainer and its checkpoints.

:func:`train_student` runs mace-torch's own trainer (``python -m mace.cli.run_train``, arguments
from :func:`run_train_args`) on a small MACE (few channels, scalar hidden features, low
correlation order, shorter cutoff), with the reference's isolated-atom energies
(:func:`model_e0s`) as E0s so energies stay on the reference's scale. :func:`round_settings`
(with :func:`seed_checkpoint` and :func:`latest_checkpoint`) lets a training round continue from
the previous round's last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from octastem.config import schema_defaults
from octastem.io import InputError

from .sampling import ENERGY_KEY, FORCES_KEY, STRESS_KEY, read_labelled

log = logging.getLogger("octastem")


def _schema_field(section: str, key: str):
    """A dataclass field whose default is ``student.<section>.<key>`` of config/schema.yaml."""
    return field(default_factory=lambda: schema_defaults("student", section)[key])


@dataclass
class StudentSettings:
    """Architecture and training settings of the student (mace-torch run_train arguments).

    The defaults of the fields set by ``student.train`` in config/schema.yaml are taken from there."""

    num_channels: int = _schema_field("train", "num_channels")
    max_L: int = _schema_field("train", "max_L")
    max_ell: int = _schema_field("train", "max_ell")
    correlation: int = _schema_field("train", "correlation")
    num_interactions: int = 2
    r_max: float = _schema_field("train", "r_max")
    num_radial_basis: int = 6
    radial_MLP: str = "[32, 32]"
    batch_size: int = _schema_field("train", "batch_size")
    valid_batch_size: int = 8
    max_num_epochs: int = _schema_field("train", "max_num_epochs")
    lr: float = _schema_field("train", "lr")
    energy_weight: float = _schema_field("train", "energy_weight")
    forces_weight: float = _schema_field("train", "forces_weight")
    stress_weight: float = _schema_field("train", "stress_weight")
    ema_decay: float | None = _schema_field("train", "ema_decay")  # None: no moving average of the weights
    seed: int = _schema_field("train", "seed")
    default_dtype: str = "float32"
    extra_args: list[str] = field(default_factory=list)


def model_e0s(model_path, *, trust: bool = False) -> dict[int, float]:
    """Isolated-atom energies (eV) stored in a MACE model, by atomic number.

    The student is trained with the reference's E0s so both predict total energies on one scale
    and the student only learns the interaction part. ``trust``: unpickle the file even if its
    sha256 is recorded nowhere (``student.trust_model_file``).
    """
    from octastem.md.mlp import load_mace_model

    from .sampling import TRUST_KEY

    model = load_mace_model(model_path, device="cpu", trust=trust, trust_key=TRUST_KEY)
    e0 = model.atomic_energies_fn.atomic_energies.detach().cpu().numpy().reshape(-1)
    return {int(z): float(e) for z, e in zip(model.atomic_numbers.tolist(), e0, strict=True)}


def run_train_args(
    train_xyz, valid_xyz, work_dir, name: str, s: StudentSettings, e0s: dict[int, float], device: str = "cpu"
) -> list[str]:
    """Command-line arguments of ``mace.cli.run_train`` for the student (``e0s``: eV by atomic number)."""
    work_dir = Path(work_dir)
    e0s = "{" + ", ".join(f"{z}: {e!r}" for z, e in sorted(e0s.items())) + "}"
    args = [
        f"--name={name}",
        f"--seed={s.seed}",
        f"--work_dir={work_dir}",
        f"--model_dir={work_dir}",
        f"--log_dir={work_dir / 'logs'}",
        f"--checkpoints_dir={work_dir / 'checkpoints'}",
        f"--results_dir={work_dir / 'results'}",
        f"--train_file={train_xyz}",
        f"--valid_file={valid_xyz}",
        f"--energy_key={ENERGY_KEY}",
        f"--forces_key={FORCES_KEY}",
        f"--stress_key={STRESS_KEY}",
        f"--E0s={e0s}",
        "--model=MACE",
        "--interaction_first=RealAgnosticInteractionBlock",
        "--interaction=RealAgnosticResidualInteractionBlock",
        f"--num_channels={s.num_channels}",
        f"--max_L={s.max_L}",
        f"--max_ell={s.max_ell}",
        f"--correlation={s.correlation}",
        f"--num_interactions={s.num_interactions}",
        f"--r_max={s.r_max}",
        f"--num_radial_basis={s.num_radial_basis}",
        f"--radial_MLP={s.radial_MLP}",
        "--MLP_irreps=16x0e",
        "--scaling=rms_forces_scaling",
        "--loss=weighted" if s.stress_weight == 0 else "--loss=stress",
        f"--energy_weight={s.energy_weight}",
        f"--forces_weight={s.forces_weight}",
        f"--stress_weight={s.stress_weight}",
        "--compute_stress=True",
        f"--batch_size={s.batch_size}",
        f"--valid_batch_size={s.valid_batch_size}",
        f"--max_num_epochs={s.max_num_epochs}",
        f"--lr={s.lr}",
        "--amsgrad",
        *(["--ema", f"--ema_decay={s.ema_decay}"] if s.ema_decay else []),
        "--scheduler_patience=5",
        f"--patience={max(10, s.max_num_epochs)}",
        "--eval_interval=1",
        "--error_table=PerAtomRMSEstressvirials",
        f"--default_dtype={s.default_dtype}",
        f"--device={device}",
        "--save_cpu",
        "--restart_latest",
        "--num_workers=0",
    ]
    return args + list(s.extra_args)


def _run_trainer(cmd: list[str], threads: int | None, log_path) -> None:
    """Run the trainer command; its output goes to ``log_path`` (or is kept for the error message)."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning threads on a shared machine
    log.info("training student: %s", " ".join(cmd))
    out = open(log_path, "w") if log_path else None  # noqa: SIM115 (closed below)
    try:
        res = subprocess.run(cmd, env=env, stdout=out or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finally:
        if out:
            out.close()
    if res.returncode != 0:
        tail = (res.stdout or "")[-3000:] if not log_path else Path(log_path).read_text()[-3000:]
        raise RuntimeError(f"mace run_train failed (exit {res.returncode}):\n{tail}")


def train_student(
    train_xyz,
    valid_xyz,
    out_dir,
    settings: StudentSettings | None = None,
    *,
    e0s: dict[int, float],
    name: str = "student",
    device: str = "cpu",
    threads: int | None = None,
    log_path=None,
) -> Path:
    """Train the student with mace-torch's trainer; return the path of ``out_dir/<name>.model``.

    ``e0s``: isolated-atom energies (eV by atomic number), normally :func:`model_e0s` of the
    reference.
    Runs ``python -m mace.cli.run_train`` in a subprocess (``threads`` OpenMP threads) with a
    working folder ``out_dir/work``; ``--restart_latest`` makes an interrupted training resume
    from its last checkpoint. The model file is the plain pickled MACE module (CPU tensors),
    loadable with :func:`octastem.md.load_mace_model`.
    """
    from octastem.io import atomic_path

    s = settings or StudentSettings()
    for p in (train_xyz, valid_xyz):
        read_labelled(p)  # fail early, naming the file, before the trainer starts
    out_dir = Path(out_dir)
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "mace.cli.run_train",
        *run_train_args(train_xyz, valid_xyz, work, name, s, e0s, device),
    ]
    _run_trainer(cmd, threads, log_path)
    model = work / f"{name}.model"
    if not model.exists():
        raise RuntimeError(f"mace run_train finished but wrote no {model}")
    final = out_dir / f"{name}.model"
    with atomic_path(final) as tmp:
        shutil.copyfile(model, tmp)
    (out_dir / f"{name}_settings.json").write_text(json.dumps({**asdict(s), "command": cmd[1:]}, indent=1))
    return final


def latest_checkpoint(checkpoints_dir) -> tuple[Path, int] | None:
    """The mace-torch checkpoint with the highest epoch in ``checkpoints_dir`` and its epoch, or None."""
    found = []
    for p in Path(checkpoints_dir).glob("*_epoch-*.pt"):
        m = re.search(r"_epoch-(\d+)\.pt$", p.name)
        if m:
            found.append((int(m.group(1)), p))
    if not found:
        return None
    epoch, path = max(found)
    return path, epoch


def seed_checkpoint(previous_model, checkpoints_dir, name: str, seed: int) -> int:
    """Let a training run named ``name`` resume from the last checkpoint of the run that made ``previous_model``.

    mace-torch's ``--restart_latest`` loads the newest ``<name>_run-<seed>_epoch-N.pt`` of its
    checkpoint folder; the previous round's newest checkpoint (in ``<model stem>_training/work/
    checkpoints`` next to ``previous_model``) is copied there under this run's name unless this run
    already has checkpoints of its own (then it is resuming after an interruption). Returns the
    epoch training starts from.
    """
    checkpoints_dir = Path(checkpoints_dir)
    own = latest_checkpoint(checkpoints_dir)
    previous_model = Path(previous_model)
    prev_dir = previous_model.parent / (previous_model.stem + "_training") / "work" / "checkpoints"
    prev = latest_checkpoint(prev_dir)
    if prev is None:
        raise InputError(
            f"student warm start: no mace checkpoint in {prev_dir} (the training folder of {previous_model})"
        )
    if own is not None:
        return prev[1]
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(prev[0], checkpoints_dir / f"{name}_run-{seed}_epoch-{prev[1]}.pt")
    return prev[1]


def round_settings(
    s: StudentSettings, out_dir, name: str, *, warm_start=None, epochs: int | None = None
) -> StudentSettings:
    """The settings of one training round whose :func:`train_student` folder is ``out_dir``.

    ``warm_start``: the model file of the previous round; that round's last checkpoint is seeded
    into this round's checkpoint folder (:func:`seed_checkpoint`) and training continues from it
    (weights, optimiser and schedule) for ``epochs`` more epochs (``s.max_num_epochs`` when None).
    Without it, ``epochs`` (when given) replaces ``s.max_num_epochs``.
    """
    s = replace(s)
    if warm_start is not None:
        start = seed_checkpoint(warm_start, Path(out_dir) / "work" / "checkpoints", name, s.seed)
        s.max_num_epochs = start + (epochs if epochs is not None else s.max_num_epochs)
    elif epochs is not None:
        s.max_num_epochs = epochs
    return s
