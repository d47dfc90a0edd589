# Helpers and cross-checks of the validated config. Fails before any job starts, naming the key.
import json
from pathlib import Path


def _config_error(key, message):
    raise ValueError(f"config: '{key}': {message}")


def _check_config(cfg):
    systems = cfg["systems"]
    reps = cfg["structure"]["reps"]
    n_fa = reps[0] * reps[1] * reps[2]
    for name, n in systems.items():
        if n > n_fa:
            _config_error(f"systems.{name}", f"{n} FABr vacancies but the {reps} supercell has only {n_fa} FA sites")
    md = cfg["md"]
    ratio = md["frame_interval_fs"] / md["timestep_fs"]
    if abs(ratio - round(ratio)) > 1e-9:
        _config_error("md.frame_interval_fs", "must be a whole multiple of md.timestep_fs")
    if md["analysis_fs"] > md["total_fs"]:
        _config_error("md.analysis_fs", f"{md['analysis_fs']} fs exceeds md.total_fs = {md['total_fs']} fs")
    n_window = int(md["analysis_fs"] / md["frame_interval_fs"]) + 1
    if cfg["stem"]["frames"] > n_window:
        _config_error("stem.frames", f"{cfg['stem']['frames']} frames asked but the analysis window has {n_window}")
    for name, s in cfg["samples"].items():
        if "raw" not in s:
            if "system" not in s:
                _config_error(f"samples.{name}", "needs either 'raw' (a dataset) or 'system' (to simulate one)")
            if s["system"] not in systems:
                _config_error(f"samples.{name}.system", f"'{s['system']}' is not one of systems {sorted(systems)}")
        elif not Path(s["raw"]["path"]).exists():
            _config_error(f"samples.{name}.raw.path", f"file {s['raw']['path']} not found")
    if cfg["reconstruct"]["table_method"] not in cfg["reconstruct"]["methods"]:
        _config_error("reconstruct.table_method", "must be one of reconstruct.methods")
    for i, col in enumerate(cfg["table1"]):
        if "sample" in col and col["sample"] not in cfg["samples"]:
            _config_error(f"table1[{i}].sample", f"'{col['sample']}' is not one of samples {sorted(cfg['samples'])}")
        if "system" in col and col["system"] not in systems:
            _config_error(f"table1[{i}].system", f"'{col['system']}' is not one of systems {sorted(systems)}")


_check_config(config)

SYSTEMS = list(config["systems"])
SAMPLES = list(config["samples"])
RAW_SAMPLES = [s for s in SAMPLES if "raw" in config["samples"][s]]
SIM_SAMPLES = [s for s in SAMPLES if "raw" not in config["samples"][s]]
METHODS = config["reconstruct"]["methods"]


wildcard_constraints:
    system="|".join(SYSTEMS),
    sample="|".join(SAMPLES),
    method="|".join(METHODS),
    round=r"\d+",


def md_model_input(wildcards):
    """The MACE model file when md.potential is a path (so new weights re-run MD); none for registry entries."""
    import yaml

    registry = yaml.safe_load((Path(workflow.basedir) / "resources" / "external.yaml").read_text())
    potential = config["md"]["potential"]
    return [] if potential in registry else local_path(potential)


def md_device():
    return config["md"]["device"]


def md_gpus():
    """GPUs requested by the MD rule: one when the config asks for CUDA."""
    return 1 if md_device().startswith("cuda") else 0


def sample_seed(sample):
    """Noise seed of a sample: the config seed combined with a stable hash of its name (order-independent)."""
    import zlib

    return (config["seed"] * 1_000_003 + zlib.crc32(sample.encode())) % 2**32


def analysis_start_fs():
    return config["md"]["total_fs"] - config["md"]["analysis_fs"]


def image_geometry():
    """In-plane unit cells covered by every image (the supercell's nx, ny)."""
    reps = config["structure"]["reps"]
    return [reps[0], reps[1]]


def local_path(path):
    """A path from the config: as given when it exists (relative to the working directory), else in this repository."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(path)
    return str(Path(workflow.basedir) / p)


def one_of(names):
    """Wildcard constraint matching exactly one of ``names`` (nothing when empty)."""
    return "|".join(names) if names else "(?!)"


def image_geometry_of(sample):
    """In-plane cells covered by the phase image of ``sample``: the averaged supercell for raw data."""
    if sample in RAW_SAMPLES:
        return list(config["average"]["supercell"])
    return image_geometry()


def table1_fits():
    """Fit summaries behind each Table 1 column, in column order."""
    out = []
    for col in config["table1"]:
        if "sample" in col:
            out.append(f"results/fit/{col['sample']}_{config['reconstruct']['table_method']}.json")
        else:
            out.append(f"results/fit/md_{col['system']}.json")
    return out


def fit_names():
    """Names of all fits: those behind Table 1 (sample_method or md_system) and every sample by every method."""
    names = [Path(p).stem for p in table1_fits()]
    names += [f"{s}_{m}" for s in SAMPLES for m in METHODS if f"{s}_{m}" not in names]
    return names


def fit_image(wildcards):
    name = wildcards.name
    if name.startswith("md_"):
        return f"results/potential/{name[3:]}.h5"
    sample, method = name.rsplit("_", 1)
    return f"results/reconstruct/{sample}/{method}.h5"


def student_final_round():
    """Index of the last student sampling round (its model is the one validated)."""
    return len(config["student"]["rounds"]) - 1
