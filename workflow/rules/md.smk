rule md:
    """MACE NPT molecular dynamics (Langevin thermostat, anisotropic barostat); resumable trajectory."""
    input:
        structure="results/structure/{system}.extxyz",
    output:
        trajectory="results/md/{system}/trajectory.h5",
    params:
        potential=config["md"]["potential"],
        device=config["md"]["device"],
        dtype=config["md"]["dtype"],
        temperature_K=config["md"]["temperature_K"],
        pressure_MPa=config["md"]["pressure_MPa"],
        timestep_fs=config["md"]["timestep_fs"],
        total_fs=config["md"]["total_fs"],
        frame_interval_fs=config["md"]["frame_interval_fs"],
        T_tau_fs=config["md"]["T_tau_fs"],
        P_tau_fs=config["md"]["P_tau_fs"],
        checkpoint_every=config["md"]["checkpoint_every"],
        seed=config["seed"],
    log:
        "logs/md/{system}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime="4h",
        gpu=md_gpus(),
    script:
        "../scripts/md.py"


rule md_summary:
    """Temperature, energy and lattice parameters over the analysis window of the MD run."""
    input:
        trajectory="results/md/{system}/trajectory.h5",
    output:
        summary="results/md/{system}/summary.json",
    params:
        start_fs=analysis_start_fs(),
    log:
        "logs/md_summary/{system}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
        gpu=0,
    script:
        "../scripts/md_summary.py"
