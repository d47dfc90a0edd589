CNN_SHARDS = [
    f"{k:02d}"
    for k in (
        range(config["cnn"]["shards"]) if isinstance(config["cnn"]["shards"], int) else config["cnn"]["shards"]
    )
]


rule cnn_training_set:
    """One HDF5 shard of abTEM 4D-STEM training scans over many crystal prototypes (FAPbBr3 held out)."""
    output:
        shard="results/cnn/training_set/shard_{shard}.h5",
    params:
        n_scans=config["cnn"]["scans_per_shard"],
        n_frames=config["cnn"]["frames"],
        static_fraction=config["cnn"]["static_fraction"],
        seed=lambda wc: config["cnn"]["train"]["seed"] * 1000 + int(wc.shard),
    log:
        "logs/cnn/training_set_{shard}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime="2h",
        gpu=0,
    script:
        "../scripts/cnn_training_set.py"


rule train_cnn:
    """Train the CNN (GPU when present); resumes from its checkpoint; writes validation curves."""
    input:
        shards=expand("results/cnn/training_set/shard_{shard}.h5", shard=CNN_SHARDS),
        init=[config["cnn"]["train"]["init_weights"]] if config["cnn"]["train"].get("init_weights") else [],
    output:
        weights="results/cnn/train/weights.pt",
        curve=report("results/cnn/train/curve.png", category="CNN", caption="../report/cnn_curve.rst"),
        summary="results/cnn/train/training.json",
    params:
        train=config["cnn"]["train"],
        device=config["cnn"]["device"],
    log:
        "logs/cnn/train.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime="6h",
        gpu=1 if config["cnn"]["device"].startswith("cuda") else 0,
    script:
        "../scripts/train_cnn.py"


rule evaluate_cnn:
    """CNN versus iCOM on held-out simulated FAPbBr3 (48, 144 e/A^2, noise free): Pearson, SSIM, ellipticity bias."""
    input:
        weights=local_path(config["cnn"]["weights"]),
    output:
        metrics="results/cnn/eval/metrics.json",
        table=report("results/cnn/eval/metrics.csv", category="CNN", caption="../report/cnn_eval.rst"),
    params:
        averaged_cells=config["cnn"]["evaluate"]["averaged_cells"],
        n_seeds=config["cnn"]["evaluate"]["n_seeds"],
        seed=config["seed"],
        device=config["cnn"]["device"],
    log:
        "logs/cnn/evaluate.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime="2h",
        gpu=0,
    script:
        "../scripts/evaluate_cnn.py"


rule evaluate_suite:
    """Known-truth suite: every reconstruct method on split-cubic APbBr3 cases of set Br column shape (evaluation.*)."""
    input:
        weights=local_path(config["cnn"]["weights"]),
    output:
        table=report("results/cnn/suite/suite.csv", category="CNN", caption="../report/suite.rst"),
        summary="results/cnn/suite/suite.json",
        markdown="results/cnn/suite/suite.md",
        plot=report("results/cnn/suite/suite.png", category="CNN", caption="../report/suite.rst"),
    params:
        evaluation=config["evaluation"],
        optics={
            key: config["stem"][key]
            for key in ("energy_eV", "semiangle_mrad", "max_angle_mrad", "sampling_A", "slice_thickness_A")
        },
        seed=config["seed"],
        device=config["cnn"]["device"],
    log:
        "logs/cnn/evaluate_suite.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime="24h",
        gpu=0,
    script:
        "../scripts/evaluate_suite.py"
