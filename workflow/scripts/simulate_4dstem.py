from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.simulate_4dstem(
        trajectory=snakemake.input.trajectory,
        output=snakemake.output.stem,
        threads=snakemake.threads,
        **dict(snakemake.params.items()),
    )
