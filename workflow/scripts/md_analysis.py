from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.md_analysis(
        trajectory=snakemake.input.trajectory,
        output=snakemake.output.analysis,
        average_structure=snakemake.output.average,
        **dict(snakemake.params.items()),
    )
