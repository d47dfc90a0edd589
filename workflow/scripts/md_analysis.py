from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.md_analysis(
        snakemake.input.trajectory,
        snakemake.output.analysis,
        snakemake.output.average,
        **dict(snakemake.params.items()),
    )
