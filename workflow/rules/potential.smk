rule snapshot_potential:
    """abTEM projected potential along [001] of every snapshot of the analysis window, averaged."""
    input:
        trajectory="results/md/{system}/trajectory.h5",
    output:
        image="results/potential/{system}.h5",
    params:
        start_fs=analysis_start_fs(),
        every_fs=config["md"]["frame_interval_fs"],
        sampling_A=config["potential"]["sampling_A"],
        slice_thickness_A=config["potential"]["slice_thickness_A"],
        n_cells=image_geometry(),
    log:
        "logs/potential/{system}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime="1h",
        gpu=0,
    script:
        "../scripts/snapshot_potential.py"
