from octastem import stages

with stages.logged(snakemake.log[0]):
    stages.md_analysis(
        snakemake.input.trajectory,
        snakemake.output.analysis,
        snakemake.output.average,
        **dict(snakemake.params.items()),
    )
