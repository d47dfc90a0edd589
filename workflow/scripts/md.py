from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.md(
        structure_path=snakemake.input.structure,
        output=snakemake.output.trajectory,
        threads=snakemake.threads,
        model_path=snakemake.input.model or None,
        **dict(snakemake.params.items()),
    )
