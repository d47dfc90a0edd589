rule simulate_4dstem:
    """Noise-free abTEM multislice 4D-STEM of MD snapshots (frozen phonons) over the periodic cell."""
    input:
        trajectory="results/md/{system}/trajectory.h5",
    output:
        stem="results/stem/clean/{system}.h5",
    params:
        start_fs=analysis_start_fs(),
        frames=config["stem"]["frames"],
        energy_eV=config["stem"]["energy_eV"],
        semiangle_mrad=config["stem"]["semiangle_mrad"],
        scan_step_A=config["stem"]["scan_step_A"],
        max_angle_mrad=config["stem"]["max_angle_mrad"],
        sampling_A=config["stem"]["sampling_A"],
        slice_thickness_A=config["stem"]["slice_thickness_A"],
        n_cells=image_geometry(),
    log:
        "logs/simulate_4dstem/{system}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime="2h",
        gpu=0,
    script:
        "../scripts/simulate_4dstem.py"


rule simulate_nanocrystal:
    """Noise-free abTEM 4D-STEM of a cube nanocrystal cut from MD frames (one per frozen phonon), central scan.

    Plain multislice or PRISM (stem.method)."""
    input:
        trajectory="results/md/{system}/trajectory.h5",
    output:
        stem="results/stem/nanocrystal/{system}.h5",
        structure="results/stem/nanocrystal/{system}.extxyz",
    params:
        start_fs=analysis_start_fs(),
        frames=config["stem"]["frames"],
        energy_eV=config["stem"]["energy_eV"],
        semiangle_mrad=config["stem"]["semiangle_mrad"],
        scan_step_A=config["stem"]["scan_step_A"],
        max_angle_mrad=config["stem"]["max_angle_mrad"],
        slice_thickness_A=config["stem"]["slice_thickness_A"],
        edge_A=config["stem"]["nanocrystal"]["edge_A"],
        vacuum_A=config["stem"]["nanocrystal"]["vacuum_A"],
        scan_cells=config["stem"]["nanocrystal"]["scan_cells"],
        tiles=config["stem"]["nanocrystal"]["tiles"],
        sampling_A=config["stem"]["nanocrystal"]["sampling_A"],
        detector_sampling_mrad=config["stem"]["nanocrystal"]["detector_sampling_mrad"],
        method=config["stem"]["method"],
        prism_interpolation=config["stem"]["prism_interpolation"],
        prism_margin_A=config["stem"]["prism_margin_A"],
    log:
        "logs/simulate_nanocrystal/{system}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime="4h",
        gpu=0,
    script:
        "../scripts/simulate_nanocrystal.py"


rule dose_nanocrystal:
    """A simulated nanocrystal acquisition: Poisson counts at the sample's dose, one scan (averaged later)."""
    wildcard_constraints:
        sample=one_of(NANOCRYSTAL_SAMPLES),
    input:
        lambda wc: f"results/stem/nanocrystal/{sample_system(wc.sample)}.h5",
    output:
        stem="results/stem/raw/{sample}.h5",
    params:
        dose_e_per_A2=lambda wc: config["samples"][wc.sample]["dose_e_per_A2"],
        seed=lambda wc: sample_seed(wc.sample),
        averaged_cells=1,
    log:
        "logs/dose_nanocrystal/{sample}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime="30m",
        gpu=0,
    script:
        "../scripts/dose.py"


rule dose:
    """A simulated sample of the periodic cell: Poisson counts at its dose, averaged over equivalent cells."""
    wildcard_constraints:
        sample=one_of(PERIODIC_SAMPLES),
    input:
        lambda wc: f"results/stem/clean/{sample_system(wc.sample)}.h5",
    output:
        stem="results/stem/{sample}.h5",
        summary="results/stem/dose/{sample}.json",
    params:
        dose_e_per_A2=lambda wc: config["samples"][wc.sample]["dose_e_per_A2"],
        seed=lambda wc: sample_seed(wc.sample),
        averaged_cells=config["stem"]["averaged_cells"],
    log:
        "logs/dose/{sample}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime="30m",
        gpu=0,
    script:
        "../scripts/dose.py"


rule simulate_like:
    """A measured sample's like-for-like twin: its MD system's frames as a nanocrystal scanned with the
    sample's own calibration (energy, semi-angle, scan step, detector sampling and extent), scan size,
    thickness and dose; averaged, reconstructed and fitted like the sample."""
    wildcard_constraints:
        sample=one_of(list(SIMULATED_LIKE)),
    input:
        measured=lambda wc: f"results/stem/raw/{SIMULATED_LIKE[wc.sample]}.h5",
        trajectory=lambda wc: f"results/md/{LIKE_SYSTEM[wc.sample]}/trajectory.h5",
    output:
        stem="results/stem/raw/{sample}.h5",
        structure="results/stem/like/{sample}.extxyz",
    params:
        start_fs=analysis_start_fs(),
        frames=config["stem"]["frames"],
        thickness_A=config["reconstruct"]["thickness_A"],
        vacuum_A=config["stem"]["nanocrystal"]["vacuum_A"],
        tiles=config["stem"]["nanocrystal"]["tiles"],
        slice_thickness_A=config["stem"]["slice_thickness_A"],
        method=config["stem"]["method"],
        prism_interpolation=config["stem"]["prism_interpolation"],
        prism_margin_A=config["stem"]["prism_margin_A"],
        seed=lambda wc: sample_seed(wc.sample),
    log:
        "logs/simulate_like/{sample}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime="4h",
        gpu=0,
    script:
        "../scripts/simulate_like.py"


rule reconstruct:
    """Phase image from the 4D-STEM dataset by the named method (icom, icom_wiener, cnn, ssb, wdd)."""
    input:
        stem=stem_input,
        # the route's summary (averaging or periodic dose): switching stem.specimen re-makes the dataset
        summary=stem_summary,
        weights=lambda wc: local_path(config["cnn"]["weights"]) if wc.method == "cnn" else [],
    output:
        image="results/reconstruct/{sample}/{method}.h5",
    params:
        n_cells=lambda wc: image_geometry_of(wc.sample),
        sampling_A=config["reconstruct"]["sampling_A"],
        device=lambda wc: config["cnn"]["device"] if wc.method == "cnn" else "cpu",
        thickness_A=lambda wc: thickness_of(wc.sample),
        wiener_eps=config["reconstruct"]["wiener_eps"],
    log:
        "logs/reconstruct/{sample}_{method}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime="30m",
        gpu=0,
    script:
        "../scripts/reconstruct.py"


rule ingest:
    """A measured dataset -> internal HDF5 (electrons), calibration from file or config, dose checked, the
    bright-field disc centred (descan fitted) and the detector turned onto the scan axes (rotation measured)."""
    wildcard_constraints:
        sample=one_of(RAW_SAMPLES),
    input:
        raw=lambda wc: config["samples"][wc.sample]["raw"]["path"],
    output:
        stem="results/stem/raw/{sample}.h5",
        summary="results/stem/raw/{sample}.json",
    params:
        fmt=lambda wc: config["samples"][wc.sample]["raw"]["format"],
        dataset=lambda wc: config["samples"][wc.sample]["raw"].get("dataset"),
        calibration=lambda wc: config["samples"][wc.sample]["raw"]["calibration"],
        counts_per_electron=lambda wc: config["samples"][wc.sample]["raw"]["counts_per_electron"],
        dose_rtol=lambda wc: config["samples"][wc.sample]["raw"]["dose_rtol"],
        dose_e_per_A2=lambda wc: config["samples"][wc.sample]["dose_e_per_A2"],
        origin=lambda wc: config["samples"][wc.sample]["raw"]["origin"],
    log:
        "logs/ingest/{sample}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime="1h",
        gpu=0,
    script:
        "../scripts/ingest.py"


rule average:
    """Template matching: the scan's patterns averaged over equivalent lattice positions of one (super)cell.

    Measured samples, and simulated nanocrystal scans (onto one MD in-plane supercell)."""
    wildcard_constraints:
        sample=one_of(AVERAGED_SAMPLES),
    input:
        stem=average_input,
    output:
        stem="results/stem/{sample}.h5",
        summary="results/stem/averaged/{sample}.json",
    params:
        cell_shape=lambda wc: average_cell_shape(wc.sample),
        supercell=lambda wc: image_geometry_of(wc.sample),
        weights=config["average"]["weights"],
        image=config["average"]["image"],
        # the structure model's lattice parameter (samples carry none of their own) and the tolerance
        lattice_A=config["structure"]["a_A"],
        lattice_tolerance=config["average"]["lattice_tolerance"],
    log:
        "logs/average/{sample}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime="1h",
        gpu=0,
    script:
        "../scripts/average.py"
