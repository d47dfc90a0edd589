from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.fit(
        snakemake.input.image, snakemake.output.table, snakemake.output.summary, **dict(snakemake.params.items())
    )
