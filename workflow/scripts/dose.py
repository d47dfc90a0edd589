from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.dose(
        input_path=snakemake.input[0],
        output=snakemake.output.stem,
        summary=snakemake.output.get("summary"),
        **dict(snakemake.params.items()),
    )
