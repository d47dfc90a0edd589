# Helpers and cross-checks of the validated config. Fails before any job starts, naming the key.
import json
from pathlib import Path


def _config_error(key, message):
    raise ValueError(f"config: '{key}': {message}")


def _check_md(cfg):
    md = cfg["md"]
    ratio = md["frame_interval_fs"] / md["timestep_fs"]
    if abs(ratio - round(ratio)) > 1e-9:
        _config_error("md.frame_interval_fs", "must be a whole multiple of md.timestep_fs")
    if md["analysis_fs"] > md["total_fs"]:
        _config_error("md.analysis_fs", f"{md['analysis_fs']} fs exceeds md.total_fs = {md['total_fs']} fs")
    n_window = int(md["analysis_fs"] / md["frame_interval_fs"]) + 1
    if cfg["stem"]["frames"] > n_window:
        _config_error("stem.frames", f"{cfg['stem']['frames']} frames asked but the analysis window has {n_window}")


def _check_config(cfg):
    systems = cfg["systems"]
    reps = cfg["structure"]["reps"]
    n_fa = reps[0] * reps[1] * reps[2]
    for name, n in systems.items():
        if n > n_fa:
            _config_error(f"systems.{name}", f"{n} FABr vacancies but the {reps} supercell has only {n_fa} FA sites")
    if systems:  # MD settings matter only when there is MD to run
        _check_md(cfg)
    stem = cfg["stem"]
    if stem["specimen"] == "nanocrystal" and any("raw" not in s for s in cfg["samples"].values()):
        # the nanocrystal tiles the MD cell; its scan must hold >= 3 lattice periods (template matching)
        # and lie inside the crystal: checked here on the starting lattice, exactly by the stage
        nc, a = stem["nanocrystal"], cfg["structure"]["a_A"]
        scan_A = nc["scan_cells"] * min(reps[:2]) * a
        if scan_A < 3 * a - 1e-6:
            _config_error(
                "stem.nanocrystal.scan_cells",
                f"the scan covers {scan_A:g} A, fewer than 3 lattice periods ({3 * a:g} A) for template matching",
            )
        if nc["edge_A"] < max(reps) * a - 1e-6:
            _config_error("stem.nanocrystal.edge_A", f"{nc['edge_A']} A is smaller than one MD cell ({max(reps) * a:g} A)")
        if nc["edge_A"] < max(reps[:2]) * a * nc["scan_cells"] + a:
            _config_error(
                "stem.nanocrystal.edge_A",
                f"{nc['edge_A']} A leaves no room around the scan region ({nc['scan_cells']} MD cells = "
                f"{max(reps[:2]) * a * nc['scan_cells']:g} A); need at least one lattice period ({a:g} A) more",
            )
    for name, s in cfg["samples"].items():
        if "raw" not in s:
            if "system" not in s:
                _config_error(f"samples.{name}", "needs either 'raw' (a dataset) or 'system' (to simulate one)")
            if s["system"] not in systems:
                _config_error(f"samples.{name}.system", f"'{s['system']}' is not one of systems {sorted(systems)}")
        elif not Path(s["raw"]["path"]).exists():
            _config_error(f"samples.{name}.raw.path", f"file {s['raw']['path']} not found")
        elif "system" in s and s["system"] not in systems:
            _config_error(f"samples.{name}.system", f"'{s['system']}' is not one of systems {sorted(systems)}")
        elif "system" in s and s["like_for_like"] and cfg["reconstruct"].get("thickness_A") is None:
            _config_error(
                "reconstruct.thickness_A",
                f"null, but samples.{name} (measured) is compared with MD system '{s['system']}' through its own "
                f"chain, which needs the specimen thickness (A); give it, or set samples.{name}.like_for_like: false",
            )
    if cfg["reconstruct"]["table_method"] not in cfg["reconstruct"]["methods"]:
        _config_error("reconstruct.table_method", "must be one of reconstruct.methods")
    _check_table_method_step(cfg)
    for i, col in enumerate(cfg["table1"]):
        if "sample" in col and col["sample"] not in cfg["samples"]:
            _config_error(f"table1[{i}].sample", f"'{col['sample']}' is not one of samples {sorted(cfg['samples'])}")
        if "system" in col and col["system"] not in systems:
            _config_error(f"table1[{i}].system", f"'{col['system']}' is not one of systems {sorted(systems)}")


def _check_table_method_step(cfg):
    """A method with one pixel per scan position as the Table's method holds column shapes only up to
    a scan step of lambda / (4 alpha); a simulated sample scanned coarser is refused unless
    reconstruct.allow_coarse_step says so (measured data: reconstruct warns from the file's calibration)."""
    from octastem.stem import SCAN_GRID_METHODS
    from octastem.stem.reconstruct import nyquist_step_A

    method, stem = cfg["reconstruct"]["table_method"], cfg["stem"]
    if method not in SCAN_GRID_METHODS or cfg["reconstruct"]["allow_coarse_step"]:
        return
    if not any("raw" not in s for s in cfg["samples"].values()):
        return
    limit = nyquist_step_A(stem["energy_eV"], stem["semiangle_mrad"])
    if stem["scan_step_A"] > 1.02 * limit:
        _config_error(
            "stem.scan_step_A",
            f"{stem['scan_step_A']:g} A is coarser than lambda / (4 alpha) = {limit:.3f} A, the largest step at which "
            f"reconstruct.table_method '{method}' (one pixel per scan position) holds the column shapes; scan at "
            "most that step, take cnn as the Table's method, or set reconstruct.allow_coarse_step: true",
        )


_check_config(config)


def one_of(names):
    """Wildcard constraint matching exactly one of ``names`` (nothing when empty)."""
    return "|".join(names) if names else "(?!)"


# Any of systems and samples may be empty: a config of measured samples runs no MD, an MD-only
# config no 4D-STEM; Table 1 has exactly the columns config["table1"] lists.
SYSTEMS = list(config["systems"])
SAMPLES = list(config["samples"])
RAW_SAMPLES = [s for s in SAMPLES if "raw" in config["samples"][s]]
SIM_SAMPLES = [s for s in SAMPLES if "raw" not in config["samples"][s]]
# simulated samples: a nanocrystal scan (noise per acquisition, then template-matching averaged like
# measured data) or the periodic MD cell (noise of a perfect average over stem.averaged_cells cells)
NANOCRYSTAL = config["stem"]["specimen"] == "nanocrystal"
NANOCRYSTAL_SAMPLES = SIM_SAMPLES if NANOCRYSTAL else []
PERIODIC_SAMPLES = [] if NANOCRYSTAL else SIM_SAMPLES
METHODS = config["reconstruct"]["methods"]
TABLE_METHOD = config["reconstruct"]["table_method"]


def like_sample(sample):
    """Name of the like-for-like dataset of ``sample``: its MD system seen through the sample's own
    imaging chain (None without a system or with like_for_like false). A simulated sample's is the
    noise-free simulation of the same specimen (one per system: every simulated sample of a system
    shares it); a measured sample's is its system's MD frames simulated with the sample's own
    calibration, scan and dose. The names hold '-', which sample names cannot (schema), so they
    never collide with a configured sample."""
    s = config["samples"][sample]
    if "system" not in s or not s["like_for_like"]:
        return None
    return f"{sample}-md-{s['system']}" if "raw" in s else f"noisefree-{s['system']}"


# like-for-like datasets (sample -> its like-for-like dataset; each such dataset -> its MD system)
LIKE = {s: like_sample(s) for s in SAMPLES if like_sample(s)}
LIKE_SAMPLES = sorted(set(LIKE.values()))
LIKE_SYSTEM = {like: config["samples"][s]["system"] for s, like in LIKE.items()}
NOISEFREE_SAMPLES = [x for x in LIKE_SAMPLES if x.startswith("noisefree-")]
# measured sample behind each simulated like-for-like dataset of measured data
SIMULATED_LIKE = {like: s for s, like in LIKE.items() if "raw" in config["samples"][s]}
ALL_SAMPLES = SAMPLES + LIKE_SAMPLES
# template-matching averaged: measured data and their simulated twins, nanocrystal scans (noisy and noise free)
AVERAGED_SAMPLES = (
    RAW_SAMPLES + list(SIMULATED_LIKE) + NANOCRYSTAL_SAMPLES + (NOISEFREE_SAMPLES if NANOCRYSTAL else [])
)
# projections of the MD cell whose Br columns are pooled (potential.axes)
AXES = list(config["potential"]["axes"])


wildcard_constraints:
    system=one_of(SYSTEMS),
    sample=one_of(ALL_SAMPLES),
    method=one_of(METHODS),
    axis=one_of(AXES),
    round=r"\d+",


def md_model_input(wildcards):
    """The MACE model file when md.potential is a path (so new weights re-run MD); none for registry entries."""
    from octastem.registry import is_entry

    potential = config["md"]["potential"]
    return [] if is_entry(potential) else local_path(potential)


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


def image_geometry_of(sample):
    """In-plane cells covered by the phase image of ``sample``: the averaged supercell for raw data.

    Simulated samples cover the MD in-plane supercell (nanocrystal scans are averaged onto it).
    """
    if sample in RAW_SAMPLES or sample in SIMULATED_LIKE:
        return list(config["average"]["supercell"])
    return image_geometry()


def thickness_of(sample):
    """Specimen thickness (A) along the beam for icom_wiener: reconstruct.thickness_A when given, else
    that of the simulated specimen (the nanocrystal's edge, or the periodic MD cell along z); None for
    measured data without it (icom_wiener then stops with a clear error)."""
    given = config["reconstruct"].get("thickness_A")
    if given is not None:
        return float(given)
    if sample in RAW_SAMPLES or sample in SIMULATED_LIKE:
        return None
    if NANOCRYSTAL:
        return float(config["stem"]["nanocrystal"]["edge_A"])
    return float(config["structure"]["reps"][2] * config["structure"]["a_A"])


def suite_table_path():
    """reconstruct.suite_table resolved like the CNN weights (local_path), or None when not configured."""
    table = config["reconstruct"].get("suite_table")
    return local_path(table) if table else None


def suite_table_input():
    """The suite table as an input of the report, as the CNN weights are (a new one re-makes Table 1);
    none when reconstruct.suite_table is null."""
    path = suite_table_path()
    return [path] if path else []


def md_sensitivity_input():
    """md.sensitivity_table resolved like the CNN weights, as an input of the report; none when null."""
    table = config["md"].get("sensitivity_table")
    return [local_path(table)] if table else []


def average_cell_shape(sample):
    """Output positions per averaged (super)cell: from the config for raw data; null for a simulated
    nanocrystal scan, whose recorded positions per MD cell are used (equal contributions per position)."""
    if sample in RAW_SAMPLES or sample in SIMULATED_LIKE:
        return list(config["average"]["cell_shape"])
    return None


def stem_summary(wildcards):
    """JSON summary written with the dataset that is reconstructed, by the route that makes it."""
    if wildcards.sample in AVERAGED_SAMPLES:
        return f"results/stem/averaged/{wildcards.sample}.json"
    if wildcards.sample in NOISEFREE_SAMPLES:  # the periodic cell's noise-free simulation itself
        return f"results/stem/clean/{LIKE_SYSTEM[wildcards.sample]}.h5"
    return f"results/stem/dose/{wildcards.sample}.json"


def stem_input(wildcards):
    """The dataset a sample is reconstructed from: averaged (measured, nanocrystal) or the periodic
    cell's (noisy by the dose rule, or the noise-free simulation for a like-for-like dataset)."""
    sample = wildcards.sample
    if sample in NOISEFREE_SAMPLES and not NANOCRYSTAL:
        return f"results/stem/clean/{LIKE_SYSTEM[sample]}.h5"
    return f"results/stem/{sample}.h5"


def average_input(wildcards):
    """The scan a sample's template average is taken over: the noise-free nanocrystal simulation for
    a noise-free like-for-like dataset, else the acquisition (ingested, simulated or dosed)."""
    sample = wildcards.sample
    if sample in NOISEFREE_SAMPLES:
        return f"results/stem/nanocrystal/{LIKE_SYSTEM[sample]}.h5"
    return f"results/stem/raw/{sample}.h5"


def sample_system(sample):
    if sample in LIKE_SYSTEM:
        return LIKE_SYSTEM[sample]
    return config["samples"][sample]["system"]


def noise_bias_draws_of(sample):
    """fit.noise_bias_draws for a noisy dataset; none for a noise-free one (there is no noise to bias it)."""
    return 0 if sample in NOISEFREE_SAMPLES else config["fit"]["noise_bias_draws"]


def like_fits():
    """Fit summaries of the like-for-like datasets of the Table 1 samples (the Table's method), by dataset."""
    out = {}
    for col in config["table1"]:
        like = LIKE.get(col.get("sample"))
        if like:
            out[like] = f"results/fit/{like}_{TABLE_METHOD}.json"
    return out


def table1_fits():
    """Fit summaries behind each Table 1 column, in column order."""
    out = []
    for col in config["table1"]:
        if "sample" in col:
            out.append(f"results/fit/{col['sample']}_{config['reconstruct']['table_method']}.json")
        else:
            out.append(f"results/fit/md_{col['system']}.json")
    return out


def md_report_figures():
    """MD figures of the report target (md_figures makes the per-system ones beside it, md_statistics
    the convergence of each Table 1 system); none without systems."""
    if not SYSTEMS:
        return []
    return ["results/report/figures/angle_vs_vacancies.png"] + [
        f"results/report/figures/convergence_{s}.png" for s in table1_systems()
    ]


def table1_systems():
    return [col["system"] for col in config["table1"] if "system" in col]


def fit_names():
    """Names of all fitted images: every sample by every method (sample_method) and every projection
    of the MD systems behind Table 1 (md_system_axis)."""
    names = [f"{s}_{m}" for s in SAMPLES for m in METHODS]
    names += [f"{like}_{TABLE_METHOD}" for like in like_fits()]
    names += [f"md_{s}_{a}" for s in table1_systems() for a in AXES]
    return names


def fit_image(wildcards):
    name = wildcards.name
    if name.startswith("md_"):
        system, axis = name[3:].rsplit("_", 1)
        return f"results/potential/{system}/{axis}.h5"
    sample, method = split_sample_method(name)
    return f"results/reconstruct/{sample}/{method}.h5"


def split_sample_method(name):
    """(sample, method) of a fit name ``<sample>_<method>``; both may hold underscores (icom_wiener),
    so the name is matched against the configured methods, longest first."""
    for method in sorted(METHODS, key=len, reverse=True):
        sample = name[: -len(method) - 1]
        if name.endswith(f"_{method}") and sample in ALL_SAMPLES:
            return sample, method
    raise ValueError(f"fit name {name!r} is not <sample>_<method> for samples {ALL_SAMPLES} and methods {METHODS}")


def student_final_round():
    """Index of the last student sampling round (its model is the one validated)."""
    return len(config["student"]["rounds"]) - 1
