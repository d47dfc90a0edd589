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
    threads: 2
    resources:
        mem_mb=8000,
        runtime="2h",
        gpu=0,
    script:
        "../scripts/simulate_4dstem.py"


rule dose:
    """The sample's 4D-STEM dataset: Poisson counts at its total dose (simulated), or the raw file checked."""
    input:
        stem_input,
    output:
        stem="results/stem/{sample}.h5",
    params:
        dose_e_per_A2=lambda wc: config["samples"][wc.sample]["dose_e_per_A2"],
        simulated=lambda wc: "raw" not in config["samples"][wc.sample],
        seed=lambda wc: config["seed"] + 1000 + SAMPLES.index(wc.sample),
        averaged_cells=config["stem"]["averaged_cells"],
    log:
        "logs/dose/{sample}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime="30m",
        gpu=0,
    script:
        "../scripts/dose.py"


rule reconstruct:
    """Phase image from the 4D-STEM dataset by the named method (icom)."""
    input:
        stem="results/stem/{sample}.h5",
    output:
        image="results/reconstruct/{sample}/{method}.h5",
    params:
        n_cells=image_geometry(),
    log:
        "logs/reconstruct/{sample}_{method}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime="30m",
        gpu=0,
    script:
        "../scripts/reconstruct.py"
