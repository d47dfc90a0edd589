rule structure:
    """Cubic FAPbBr3 supercell with the system's number of FABr vacancies (seeded random sites)."""
    output:
        "results/structure/{system}.extxyz",
    params:
        n_vacancies=lambda wc: config["systems"][wc.system],
        reps=config["structure"]["reps"],
        a_A=config["structure"]["a_A"],
        seed=config["structure"]["vacancy_seed"],
    log:
        "logs/structure/{system}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime="5m",
        gpu=0,
    script:
        "../scripts/structure.py"
