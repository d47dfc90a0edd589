from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.ingest(
        snakemake.input.raw, snakemake.output.stem, snakemake.output.summary, **dict(snakemake.params.items())
    )
