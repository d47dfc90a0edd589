from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.average(
        snakemake.input.stem, snakemake.output.stem, snakemake.output.summary, **dict(snakemake.params.items())
    )
