rule md:
    """MACE NPT molecular dynamics (Langevin thermostat, anisotropic barostat); resumable trajectory."""
    input:
        structure="results/structure/{system}.extxyz",
        model=md_model_input,
    output:
        trajectory="results/md/{system}/trajectory.h5",
    params:
        potential=config["md"]["potential"],
        trust_model_file=config["md"]["trust_model_file"],
        device=config["md"]["device"],
        dtype=config["md"]["dtype"],
        temperature_K=config["md"]["temperature_K"],
        pressure_MPa=config["md"]["pressure_MPa"],
        timestep_fs=config["md"]["timestep_fs"],
        hydrogen_mass_u=config["md"]["hydrogen_mass_u"],
        total_fs=config["md"]["total_fs"],
        frame_interval_fs=config["md"]["frame_interval_fs"],
        T_tau_fs=config["md"]["T_tau_fs"],
        P_tau_fs=config["md"]["P_tau_fs"],
        checkpoint_every=config["md"]["checkpoint_every"],
        seed=config["seed"],
    log:
        "logs/md/{system}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime="4h",
        gpu=md_gpus(),
    script:
        "../scripts/md.py"


rule md_analysis:
    """Pb-Br-Pb angles, Br displacements, lattice parameters, temperature over the analysis window."""
    input:
        trajectory="results/md/{system}/trajectory.h5",
    output:
        analysis="results/md/{system}/analysis.json",
        average="results/md/{system}/average.extxyz",
    params:
        start_fs=analysis_start_fs(),
        reps=config["structure"]["reps"],
    log:
        "logs/md_analysis/{system}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime="30m",
        gpu=0,
    script:
        "../scripts/md_analysis.py"


rule md_figures:
    """Angle distributions and lattice parameters per system; mean angle versus vacancies (S11)."""
    input:
        analyses=expand("results/md/{system}/analysis.json", system=SYSTEMS),
    output:
        per_system=report(
            expand("results/report/figures/md_analysis_{system}.png", system=SYSTEMS),
            category="MD",
            caption="../report/md_analysis.rst",
        ),
        series=report(
            "results/report/figures/angle_vs_vacancies.png",
            category="MD",
            caption="../report/angle_vs_vacancies.rst",
        ),
    params:
        systems=config["systems"],
    log:
        "logs/report/md_figures.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime="5m",
        gpu=0,
    script:
        "../scripts/md_figures.py"
