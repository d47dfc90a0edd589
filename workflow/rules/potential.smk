rule snapshot_potential:
    """abTEM projected potential along one cell axis of every snapshot of the analysis window,
    averaged, with the means of consecutive time blocks (potential.block_fs) beside it."""
    input:
        trajectory="results/md/{system}/trajectory.h5",
    output:
        image="results/potential/{system}/{axis}.h5",
    params:
        axis=lambda wc: wc.axis,
        block_fs=config["potential"]["block_fs"],
        start_fs=analysis_start_fs(),
        every_fs=config["md"]["frame_interval_fs"],
        sampling_A=config["potential"]["sampling_A"],
        slice_thickness_A=config["potential"]["slice_thickness_A"],
        n_cells=config["structure"]["reps"],
    log:
        "logs/potential/{system}_{axis}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime="1h",
        gpu=0,
    script:
        "../scripts/snapshot_potential.py"
