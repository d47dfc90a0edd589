"""CNN phase reconstruction from 4D-STEM with super-resolution (after Friedrich et al., Microsc.
Microanal. 29 (2023) 395).

For every scan position the 3x3 kernel of neighbouring diffraction patterns, together with the
probe, goes into a small convolutional network that predicts the phase of the object in a patch
around that position, sampled ``UPSAMPLE`` times finer than the scan step; the patches are
combined by weighted periodic overlap-add into the phase image.

Modules:

- ``input``: the canonical input (detector grid over +-2 alpha, rebinning, probe, sampling
  parameter, kernels) and the band-limited target phase;
- ``model``: the network (:class:`ModelConfig`, :func:`build_model`) and weights files;
- ``infer``: inference (:func:`predict_phase`, streamed over scan rows) and the overlap-add;
- ``train``: training (:class:`TrainingSet`, :class:`TrainConfig`, :func:`split_scans`, :func:`train`);
- ``data``: training shards simulated with abTEM over many crystal prototypes (FAPbBr3 held out);
- ``evaluate``: CNN against iCOM on held-out simulated FAPbBr3.

Here ``train`` and ``evaluate`` are the functions of the modules of that name; the modules' other
names import from them (``from octastem.cnn.train import TrainingSet``).
"""

from .data import random_example, random_structure, simulate_scan, static_distortion, write_shard
from .evaluate import OPTICS, br_ellipticity, evaluate, held_out_frames, pearson, ssim
from .infer import extract_patches, overlap_add, patch_window, predict_phase
from .input import (
    EXTENT_ALPHA,
    INPUT_SCALE,
    KERNEL,
    N_CHANNELS,
    N_K,
    PATCH,
    UPSAMPLE,
    band_limit,
    canonical_patterns,
    check_patterns,
    check_scan,
    kernel_inputs,
    probe_pattern,
    sampling_parameter,
    target_phase,
)
from .model import DEFAULT_WEIGHTS, ModelConfig, build_model, load_model, read_weights, save_weights
from .train import TrainConfig, TrainingSet, split_scans, train, write_curve

__all__ = [
    "DEFAULT_WEIGHTS",
    "EXTENT_ALPHA",
    "INPUT_SCALE",
    "KERNEL",
    "N_CHANNELS",
    "N_K",
    "OPTICS",
    "PATCH",
    "UPSAMPLE",
    "ModelConfig",
    "TrainConfig",
    "TrainingSet",
    "band_limit",
    "br_ellipticity",
    "build_model",
    "canonical_patterns",
    "check_patterns",
    "check_scan",
    "evaluate",
    "extract_patches",
    "held_out_frames",
    "kernel_inputs",
    "load_model",
    "overlap_add",
    "patch_window",
    "pearson",
    "predict_phase",
    "probe_pattern",
    "random_example",
    "random_structure",
    "read_weights",
    "sampling_parameter",
    "save_weights",
    "simulate_scan",
    "split_scans",
    "ssim",
    "static_distortion",
    "target_phase",
    "train",
    "write_curve",
    "write_shard",
]
