from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.md_statistics(
        tables=list(snakemake.input.tables),
        summaries=list(snakemake.input.summaries),
        potentials=list(snakemake.input.potentials),
        table=snakemake.output.table,
        summary=snakemake.output.summary,
        figure=snakemake.output.figure,
        **dict(snakemake.params.items()),
    )
