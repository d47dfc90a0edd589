FIT_PARAMS = dict(
    types=config["fit"]["types"],
    window_A=config["fit"]["window_A"],
    se_method=config["fit"]["se_method"],
    seed=config["seed"],
)


rule fit_stem:
    """Elliptical Gaussian fit (lmfit) of the atomic columns of a reconstructed phase image."""
    input:
        image="results/reconstruct/{sample}/{method}.h5",
    output:
        table="results/fit/{sample}_{method}.csv",
        summary="results/fit/{sample}_{method}.json",
    params:
        **FIT_PARAMS,
    log:
        "logs/fit/{sample}_{method}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime="30m",
        gpu=0,
    script:
        "../scripts/fit.py"


rule fit_md:
    """Elliptical Gaussian fit of the averaged projected potential of an MD system."""
    input:
        image="results/potential/{system}.h5",
    output:
        table="results/fit/md_{system}.csv",
        summary="results/fit/md_{system}.json",
    params:
        **FIT_PARAMS,
    log:
        "logs/fit/md_{system}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime="30m",
        gpu=0,
    script:
        "../scripts/fit.py"
