from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.simulate_like(
        measured=snakemake.input.measured,
        trajectory=snakemake.input.trajectory,
        output=snakemake.output.stem,
        structure_output=snakemake.output.structure,
        threads=snakemake.threads,
        **dict(snakemake.params.items()),
    )
