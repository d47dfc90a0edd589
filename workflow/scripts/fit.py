from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.fit(
        image_path=snakemake.input.image,
        table=snakemake.output.table,
        summary=snakemake.output.summary,
        **dict(snakemake.params.items()),
    )
