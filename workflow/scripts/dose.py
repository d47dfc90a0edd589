from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.dose(
        snakemake.input[0],
        snakemake.output.stem,
        summary=snakemake.output.get("summary"),
        **dict(snakemake.params.items()),
    )
