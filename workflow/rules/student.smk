# Distillation of the CPU student from the reference potential. Not part of `all`: the committed
# resources/student/fapbbr3_student.model is what the embedded default uses. Run it with
#   snakemake validate_student --cores all


rule student_data:
    """Configurations from short MD (round 0: reference-driven; later: student-driven), labelled by the reference."""
    input:
        driver=lambda wc: [] if int(wc.round) == 0 else f"results/student/student_r{int(wc.round) - 1}.model",
        driver_sha256=lambda wc: [] if int(wc.round) == 0 else f"results/student/student_r{int(wc.round) - 1}.model.sha256",
    output:
        data="results/student/data_r{round}.xyz",
        summary="results/student/data_r{round}.json",
    params:
        reference=config["student"]["reference"],
        trust_model_file=config["student"]["trust_model_file"],
        round=lambda wc: config["student"]["rounds"][int(wc.round)],
    log:
        "logs/student/data_r{round}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime="2h",
        gpu=0,
    script:
        "../scripts/student_data.py"


rule train_student:
    """Train the student MACE with mace-torch on all rounds' data up to this one, continuing from the
    previous round's last checkpoint (resumable)."""
    input:
        data=lambda wc: [f"results/student/data_r{r}.xyz" for r in range(int(wc.round) + 1)],
        warm_start=lambda wc: [] if int(wc.round) == 0 else f"results/student/student_r{int(wc.round) - 1}.model",
    output:
        model="results/student/student_r{round}.model",
        sha256="results/student/student_r{round}.model.sha256",
        split=directory("results/student/split_r{round}"),
    params:
        reference=config["student"]["reference"],
        trust_model_file=config["student"]["trust_model_file"],
        train=config["student"]["train"],
        split=config["student"]["split"],
        epochs=lambda wc: config["student"]["rounds"][int(wc.round)].get("epochs"),
    log:
        "logs/student/train_r{round}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime="6h",
        gpu=0,
    script:
        "../scripts/train_student.py"


rule validate_student:
    """Held-out energy/force/stress errors, speed ratio and an MD comparison against the reference."""
    input:
        model=f"results/student/student_r{student_final_round()}.model",
        sha256=f"results/student/student_r{student_final_round()}.model.sha256",
        split=f"results/student/split_r{student_final_round()}",
    output:
        validation="results/student/validation.json",
    params:
        reference=config["student"]["reference"],
        trust_model_file=config["student"]["trust_model_file"],
        md=config["student"]["md_compare"],
        npt=config["student"]["npt_check"],
    log:
        "logs/student/validate.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime="2h",
        gpu=0,
    script:
        "../scripts/validate_student.py"
