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
        noise_bias_draws=lambda wc: noise_bias_draws_of(wc.sample),
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
    """Elliptical Gaussian fit of the averaged projected potential of an MD system along one axis."""
    input:
        image="results/potential/{system}/{axis}.h5",
    output:
        table="results/fit/md_{system}_{axis}.csv",
        summary="results/fit/md_{system}_{axis}.json",
    params:
        **FIT_PARAMS,
    log:
        "logs/fit/md_{system}_{axis}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime="30m",
        gpu=0,
    script:
        "../scripts/fit.py"


rule md_statistics:
    """The Br columns of the projections of an MD system pooled; block bootstrap over time; convergence with the window."""
    input:
        tables=expand("results/fit/md_{{system}}_{axis}.csv", axis=AXES),
        summaries=expand("results/fit/md_{{system}}_{axis}.json", axis=AXES),
        potentials=expand("results/potential/{{system}}/{axis}.h5", axis=AXES),
    output:
        table="results/fit/md_{system}.csv",
        summary="results/fit/md_{system}.json",
        figure=report(
            "results/report/figures/convergence_{system}.png",
            category="MD",
            caption="../report/convergence.rst",
            labels={"system": "{system}"},
        ),
    params:
        axes=AXES,
        replicates=config["fit"]["block_replicates"],
        frame_interval_fs=config["md"]["frame_interval_fs"],
        **FIT_PARAMS,
    log:
        "logs/fit/md_{system}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime="1h",
        gpu=0,
    script:
        "../scripts/md_statistics.py"
