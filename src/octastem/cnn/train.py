"""CNN training: shards in memory as random noisy batches (:class:`TrainingSet`), the scan split,
the training loop with resumable checkpoints, and the loss curve.

A checkpoint (``checkpoint.pt``) is a ``torch.save`` of plain types (tensors, dicts, lists,
numbers, strings), loadable with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from octastem.compute import resolve_device
from octastem.io import InputError, atomic_path, provenance, write_json
from octastem.rng import generator

from .input import INPUT_SCALE, N_CHANNELS, N_K, PATCH, UPSAMPLE, probe_pattern, sampling_parameter
from .model import ModelConfig, build_model, read_weights, save_weights


class TrainingSet:
    """All scans of some shards in memory, with index tables for random batches of kernels.

    Batches draw a dose per example (``noise_free_fraction`` noise free, the rest log-uniform in
    ``dose_range``) and Poisson noise at that dose on the fly, so noise never repeats.
    """

    def __init__(self, shards: Sequence[str | os.PathLike], scans: Sequence[tuple[str, str]] | None = None):
        pats, phases, nbr, tidx, s_par, n_e_area, norm, inv_var, scan_of = [], [], [], [], [], [], [], [], []
        n_pos = n_pix = 0
        self.names = []
        for shard in shards:
            shard = Path(shard)
            if not shard.exists():
                raise InputError(f"{shard}: training shard not found")
            with h5py.File(shard, "r") as f:
                keys = sorted(k for k in f if k.startswith("scan_"))
                for key in keys:
                    if scans is not None and (str(shard), key) not in scans:
                        continue
                    g = f[key]
                    p = g["patterns"][()].astype(np.float32)
                    t = g["phase"][()].astype(np.float32)
                    ny, nx = p.shape[:2]
                    if p.shape[2:] != (N_K, N_K) or t.shape != (ny * UPSAMPLE, nx * UPSAMPLE):
                        raise InputError(
                            f"{shard}:{key}: patterns {p.shape} / phase {t.shape} do not match "
                            f"N_K={N_K}, UPSAMPLE={UPSAMPLE}"
                        )
                    a = dict(g.attrs)
                    iy, ix = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
                    nb = np.stack(
                        [((iy + dy) % ny) * nx + (ix + dx) % nx for dy in (-1, 0, 1) for dx in (-1, 0, 1)], -1
                    )
                    nbr.append(nb.reshape(-1, 9) + n_pos)
                    H, W = t.shape
                    c = PATCH // 2
                    ry = (iy[..., None] * UPSAMPLE + np.arange(PATCH) - c) % H
                    rx = (ix[..., None] * UPSAMPLE + np.arange(PATCH) - c) % W
                    ti = ry[..., :, None] * W + rx[..., None, :]
                    tidx.append(ti.reshape(ny * nx, PATCH * PATCH) + n_pix)
                    step = 0.5 * (a["scan_step_x_A"] + a["scan_step_y_A"])
                    k = len(self.names)
                    scan_of.append(np.full(ny * nx, k))
                    s_par.append(sampling_parameter(a["energy_eV"], a["semiangle_mrad"], step))
                    n_e_area.append(a["scan_step_x_A"] * a["scan_step_y_A"])
                    norm.append(float(p.sum(axis=(2, 3)).mean()))
                    inv_var.append(1.0 / max(float(t.var()), 1e-6))
                    pats.append(p.reshape(-1, N_K, N_K))
                    phases.append(t.ravel())
                    n_pos += ny * nx
                    n_pix += H * W
                    self.names.append((str(shard), key))
        if not self.names:
            raise InputError(f"cnn: no training scans found in {list(map(str, shards))}")
        self.patterns = np.concatenate(pats)
        self.phase = np.concatenate(phases)
        self.neighbours = np.concatenate(nbr)
        self.target_index = np.concatenate(tidx)
        self.scan_of = np.concatenate(scan_of)
        self.s_param = np.asarray(s_par, dtype=np.float32)
        self.area = np.asarray(n_e_area, dtype=np.float32)
        self.norm = np.asarray(norm, dtype=np.float32)
        self.inv_var = np.asarray(inv_var, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.neighbours)

    def batch(
        self, index: np.ndarray, rng: np.random.Generator, dose_range=(10.0, 1e4), noise_free_fraction=0.15, doses=None
    ):
        """(inputs (B, N_CHANNELS, N_K, N_K), targets (B, P, P), weights (B,)) as float32 numpy arrays.

        ``doses`` (B,) fixes the dose per example (inf: noise free) instead of drawing it.
        """
        index = np.asarray(index)
        scan = self.scan_of[index]
        p = self.patterns[self.neighbours[index]]  # (B, 9, N_K, N_K), fraction of beam
        if doses is None:
            doses = np.exp(rng.uniform(np.log(dose_range[0]), np.log(dose_range[1]), size=len(index)))
            doses[rng.random(len(index)) < noise_free_fraction] = np.inf
        doses = np.asarray(doses, dtype=np.float64)
        n_e = doses * self.area[scan]
        noisy = np.isfinite(n_e)
        if np.any(noisy):
            lam = p[noisy] * n_e[noisy, None, None, None]
            p = p.copy()
            p[noisy] = rng.poisson(lam).astype(np.float32) / n_e[noisy, None, None, None]
        x = np.empty((len(index), N_CHANNELS, N_K, N_K), dtype=np.float32)
        x[:, :9] = p * (INPUT_SCALE / self.norm[scan])[:, None, None, None]
        x[:, 9] = probe_pattern() * INPUT_SCALE
        x[:, 10] = self.s_param[scan][:, None, None]
        y = self.phase[self.target_index[index]].reshape(-1, PATCH, PATCH)
        return x, y, self.inv_var[scan]


@dataclass(kw_only=True)
class TrainConfig:
    """Training settings (stored in checkpoints and the model card).

    The settings of ``cnn.train`` in ``config/schema.yaml`` (seed, epochs, steps_per_epoch,
    batch_size, lr, init_weights) have their defaults there: :meth:`from_schema` builds a
    config from them. ``init_weights``: fine-tune, starting from these weights (same width and
    hidden).
    """

    seed: int
    epochs: int
    steps_per_epoch: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-4
    val_fraction: float = 0.1
    val_batches: int = 8
    dose_min: float = 10.0
    dose_max: float = 1e4
    noise_free_fraction: float = 0.15
    width: int = 32
    hidden: int = 256
    init_weights: str | None

    @classmethod
    def from_schema(cls, **settings) -> TrainConfig:
        """The schema defaults of ``cnn.train`` (and the library defaults), overridden by ``settings``."""
        from octastem.config import schema_defaults

        return cls(**{**schema_defaults("cnn", "train"), **settings})


def split_scans(
    shards: Sequence[str | os.PathLike], val_fraction: float, seed: int, keep_out: Sequence | None = None
) -> tuple[list, list]:
    """Deterministic split of all (shard, scan) names into training and validation scans.

    ``keep_out``: (shard, scan) names that go to validation whatever the draw (the validation
    scans of the weights a fine-tune starts from, so they stay unseen)."""
    names = []
    for shard in shards:
        with h5py.File(shard, "r") as f:
            names += [(str(shard), k) for k in sorted(f) if k.startswith("scan_")]
    rng = generator(seed, "cnn_split")
    order = rng.permutation(len(names))
    n_val = max(1, int(round(val_fraction * len(names)))) if len(names) > 1 else 0
    forced = {(Path(a).name, b) for a, b in (keep_out or [])}
    is_val = np.zeros(len(names), bool)
    is_val[order[:n_val]] = True
    for i, (a, b) in enumerate(names):
        if (Path(a).name, b) in forced:
            is_val[i] = True
    val = [names[i] for i in order if is_val[i]]
    train = [names[i] for i in order if not is_val[i]]
    return train, val


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------


def train(
    shards: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    device: str = "auto",
    progress: bool = False,
    max_minutes: float | None = None,
    threads: int | None = None,
) -> dict:
    """Train the CNN on ``shards``; writes to ``out_dir``: ``checkpoint.pt`` (after every epoch,
    resumed from when present), ``weights.pt`` (final), ``curve.csv`` / ``curve.png`` (training
    and validation loss per epoch) and ``training.json``.

    ``config`` (default :meth:`TrainConfig.from_schema`); ``config.init_weights``: fine-tune,
    starting from those weights; their validation scans (recorded in their metadata) stay in
    validation.

    Loss: mean squared patch error divided by the variance of the scan's target phase
    (scale-free across thin/light and thick/heavy crystals). Validation: held-out scans
    (``val_fraction``) at fixed doses and noise seeds. Deterministic for a given seed on one
    device (``torch.use_deterministic_algorithms``). ``max_minutes`` stops after the epoch that
    crosses the limit (the run then depends on the machine's speed; recorded in training.json).
    ``threads``: CPU threads for torch (default: torch's choice).
    """
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    config = config or TrainConfig.from_schema()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device, "cnn")
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    init = read_weights(config.init_weights) if config.init_weights is not None else None
    keep_out = init.get("metadata", {}).get("val_scans") if init else None
    train_names, val_names = split_scans(shards, config.val_fraction, config.seed, keep_out=keep_out)
    train_set = TrainingSet(shards, train_names)
    val_set = TrainingSet(shards, val_names) if val_names else None
    model, opt, sched = _optimisation(config, init, dev)
    ckpt = out_dir / "checkpoint.pt"
    history, start_epoch = _resume(ckpt, config, model, opt, sched)
    val_batches = _validation_batches(val_set, config)

    t_start = time.perf_counter()
    stopped_early = False
    for epoch in range(start_epoch, config.epochs):
        history.append(_epoch(model, opt, sched, train_set, val_batches, config, epoch, dev, progress))
        _save_checkpoint(ckpt, model, opt, sched, epoch + 1, history, config)
        write_curve(out_dir, history, plot=False)
        if max_minutes is not None and (time.perf_counter() - t_start) / 60 > max_minutes and epoch + 1 < config.epochs:
            stopped_early = True
            break

    summary = {
        "train_config": asdict(config),
        "model_config": asdict(model.config),
        "n_train_scans": len(train_names),
        "n_val_scans": len(val_names),
        "n_train_positions": len(train_set),
        "val_scans": val_names,
        "epochs_done": len(history),
        "stopped_early_by_time_limit": stopped_early,
        "final_train_loss": history[-1]["train_loss"] if history else math.nan,
        "final_val_loss": history[-1]["val_loss"] if history else math.nan,
        "device": dev,
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "provenance": json.loads(provenance(seed=config.seed, shards=[str(s) for s in shards])),
    }
    save_weights(out_dir / "weights.pt", model, summary)
    write_curve(out_dir, history)
    write_json(out_dir / "training.json", summary)
    return summary


def _optimisation(config: TrainConfig, init: dict | None, dev: str):
    """(model, AdamW optimizer, one-cycle schedule); the model starts from ``init`` weights when given."""
    import torch

    mconf = ModelConfig(width=config.width, hidden=config.hidden)
    model = build_model(mconf).to(dev)
    if init is not None:
        if {k: init["config"].get(k) for k in ("width", "hidden")} != {"width": mconf.width, "hidden": mconf.hidden}:
            raise InputError(
                f"init_weights: {config.init_weights}: network width/hidden {init['config']} differ from the "
                f"training settings (width={mconf.width}, hidden={mconf.hidden})"
            )
        model.load_state_dict(init["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.epochs * config.steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total_steps, pct_start=0.1)
    return model, opt, sched


def _resume(ckpt: Path, config: TrainConfig, model, opt, sched) -> tuple[list[dict], int]:
    """(history, epochs done) of the checkpoint ``ckpt`` with model, optimizer, schedule and torch
    RNG restored from it; ([], 0) without one."""
    import torch

    if not ckpt.exists():
        return [], 0
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if state.get("train_config") != asdict(config):
        raise InputError(f"{ckpt}: checkpoint was written with different settings; delete it or use the same config")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state["history"], state["epoch"]


def _save_checkpoint(path: Path, model, opt, sched, epochs_done: int, history: list[dict], config: TrainConfig) -> None:
    """``checkpoint.pt``: everything :func:`_resume` needs to continue after ``epochs_done`` epochs."""
    import torch

    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": epochs_done,
        "history": history,
        "torch_rng": torch.get_rng_state(),
        "train_config": asdict(config),
        "config": asdict(model.config),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _validation_batches(val_set: TrainingSet | None, config: TrainConfig) -> list[tuple]:
    """Fixed validation examples: doses cycle through 10, 48, 144, 1000 e/A^2 and noise free."""
    if val_set is None:
        return []
    vrng = generator(config.seed, "cnn_validation")
    val_doses = np.array([10.0, 48.0, 144.0, 1000.0, np.inf])
    batches = []
    for _ in range(config.val_batches):
        idx = vrng.integers(len(val_set), size=config.batch_size)
        batches.append(val_set.batch(idx, vrng, doses=val_doses[np.arange(len(idx)) % len(val_doses)]))
    return batches


def _loss(pred, y, w):
    """Mean over the batch of the patch MSE times the scan's inverse target variance ``w``."""
    return (((pred - y) ** 2).mean(dim=(1, 2)) * w).mean()


def _epoch(
    model, opt, sched, train_set: TrainingSet, val_batches: list, config: TrainConfig, epoch: int, dev, progress: bool
) -> dict:
    """One epoch of training steps, then the validation loss: the epoch's row of the history."""
    import torch
    from tqdm.auto import tqdm

    # one generator per epoch: a resumed run draws the same batches as an uninterrupted one
    rng = generator(config.seed, "cnn_batches", epoch)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for _ in tqdm(range(config.steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress):
        idx = rng.integers(len(train_set), size=config.batch_size)
        x, y, w = train_set.batch(idx, rng, (config.dose_min, config.dose_max), config.noise_free_fraction)
        x, y, w = (torch.from_numpy(a).to(dev) for a in (x, y, w))
        loss = _loss(model(x), y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.inference_mode():
        val = [
            float(_loss(model(torch.from_numpy(x).to(dev)), torch.from_numpy(y).to(dev), torch.from_numpy(w).to(dev)))
            for x, y, w in val_batches
        ]
    return {
        "epoch": epoch + 1,
        "train_loss": float(np.mean(losses)),
        "val_loss": float(np.mean(val)) if val else math.nan,
        "lr": float(sched.get_last_lr()[0]),
        "seconds": time.perf_counter() - t0,
    }


def write_curve(out_dir: str | os.PathLike, history: list[dict], plot: bool = True) -> None:
    """curve.csv and (``plot``) curve.png: training and validation loss against epoch, in ``out_dir``."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "curve.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["epoch", "train_loss", "val_loss", "lr", "seconds"])
        writer.writeheader()
        writer.writerows(history)
    if not plot:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ep = [h["epoch"] for h in history]
    ax.semilogy(ep, [h["train_loss"] for h in history], "o-", label="training")
    ax.semilogy(ep, [h["val_loss"] for h in history], "s-", label="validation (held-out scans)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("patch MSE / target variance")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_dir / "curve.png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
