"""Seeded random streams: one helper and one table of named streams instead of ad-hoc seed offsets.

Every random step of the pipeline draws from ``generator(seed, stream, *keys)``. A stream's offset
keeps the numbers of one step independent of another's with the same config ``seed``; ``keys``
(an epoch, a shard, a dose) give a sequence of independent generators within one stream. The
offsets are those the pipeline has always used, so a config gives the same numbers as before.
"""

from __future__ import annotations

import numpy as np

#: stream name -> offset added to the config seed
STREAMS: dict[str, int] = {
    "default": 0,
    "stem_noise": 0,  # Poisson counts of a simulated 4D-STEM scan at its dose (simulate_4dstem, dose stage)
    "md_velocities": 0,  # NPT MD: Maxwell-Boltzmann start velocities
    "md_langevin": 1,  # NPT MD: Langevin noise of particles and cell
    "student_sampling": 0,  # student data: run strains, start velocities, perturbed copies
    "student_langevin": 1000,  # student data: Langevin noise of sampling run k (seed + k)
    "cnn_training_set": 0,  # CNN training shard: structures and optics; key 1: static distortions
    "cnn_split": 7919,  # CNN training/validation split of the scans
    "cnn_validation": 1,  # CNN validation batches (doses and noise)
    "cnn_batches": 0,  # CNN training batches, key: epoch
    "cnn_evaluate": 0,  # CNN evaluation: frozen phonons of the held-out structure; keys (k, dose): noise
    "fit_restarts": 0,  # column fit: perturbed restarts of failed window fits
    "fit_baseline": 1,  # round-column baseline of a fitted image: its seed (noise, restarts, bootstrap)
    "fit_block_bootstrap": 2,  # MD statistics: time blocks and columns drawn by the block bootstrap
    "fit_noise_bias": 3,  # noise bias of a fitted image: residual shifts and refit seeds
}


def generator(seed: int, stream: str = "default", *keys: int) -> np.random.Generator:
    """``np.random.default_rng`` of ``seed + STREAMS[stream]``, or of ``[seed + offset, *keys]``."""
    if stream not in STREAMS:
        raise KeyError(f"rng: unknown stream {stream!r}; known: {', '.join(sorted(STREAMS))}")
    base = int(seed) + STREAMS[stream]
    return np.random.default_rng([base, *map(int, keys)] if keys else base)
