from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.average(
        input_path=snakemake.input.stem,
        output=snakemake.output.stem,
        summary=snakemake.output.summary,
        **dict(snakemake.params.items()),
    )
