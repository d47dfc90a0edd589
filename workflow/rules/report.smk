rule table1:
    """Table 1 of the study: median Br ellipticity +- standard error of the median per column."""
    input:
        fits=table1_fits(),
        # each Table 1 sample's MD system through the sample's own chain (like_fits)
        like=list(like_fits().values()),
        md=expand("results/md/{system}/analysis.json", system=SYSTEMS),
        stem=expand("results/stem/{sample}.h5", sample=SAMPLES),
        # the known-truth suite's table (reconstruct.suite_table), from which the report states the method bias
        suite=suite_table_input(),
        # the MD value against each analysis choice (md.sensitivity_table), shown as a table
        sensitivity=md_sensitivity_input(),
        # what ingest measured of each measured dataset (disc, descan, scan rotation), stated in the notes
        ingest=expand("results/stem/raw/{sample}.json", sample=RAW_SAMPLES),
    output:
        csv=report(
            "results/report/table1.csv",
            category="Table 1",
            caption="../report/table1.rst",
        ),
        md="results/report/table1.md",
        html="results/report/table1.html",
        provenance="results/report/provenance.json",
        comparisons="results/report/comparisons.csv",
    params:
        seeds={
            "seed": config["seed"],
            "vacancy_seed": config["structure"]["vacancy_seed"],
            "sample_noise": {s: sample_seed(s) for s in SIM_SAMPLES},
        },
        columns=config["table1"],
        samples=config["samples"],
        systems=config["systems"],
        md=config["md"],
        stem=config["stem"],
        structure=config["structure"],
        method=config["reconstruct"]["table_method"],
        headline=config["fit"]["headline"],
        thickness={s: thickness_of(s) for s in SAMPLES},
        like={s: LIKE[s] for s in SAMPLES if s in LIKE},
        like_fits=like_fits(),
    log:
        "logs/report/table1.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime="5m",
        gpu=0,
    script:
        "../scripts/table1.py"


rule figure:
    """Image with the fitted elliptical Gaussians drawn and coloured by ellipticity."""
    wildcard_constraints:
        name=one_of(fit_names()),
    input:
        image=fit_image,
        table="results/fit/{name}.csv",
    output:
        png=report(
            "results/report/figures/{name}.png",
            category="Figures",
            caption="../report/figure.rst",
            labels={"dataset": "{name}"},
        ),
    log:
        "logs/report/figure_{name}.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime="5m",
        gpu=0,
    script:
        "../scripts/figure.py"


rule table1_plot:
    """Table 1 as a plot: median ellipticity with the standard error of the median per column."""
    input:
        csv="results/report/table1.csv",
    output:
        png=report(
            "results/report/figures/table1.png",
            category="Table 1",
            caption="../report/table1_plot.rst",
        ),
    log:
        "logs/report/table1_plot.log",
    conda:
        "../../envs/octastem.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime="5m",
        gpu=0,
    script:
        "../scripts/table1_plot.py"
