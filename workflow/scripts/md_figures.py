from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.md_figures(
        list(snakemake.input.analyses),
        snakemake.params.systems,
        list(snakemake.output.per_system),
        snakemake.output.series,
    )
