from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.md_figures(
        analyses=list(snakemake.input.analyses),
        systems=snakemake.params.systems,
        outputs=list(snakemake.output.per_system),
        series_output=snakemake.output.series,
    )
