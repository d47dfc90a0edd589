from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.ingest(
        raw=snakemake.input.raw,
        output=snakemake.output.stem,
        summary=snakemake.output.summary,
        **dict(snakemake.params.items()),
    )
