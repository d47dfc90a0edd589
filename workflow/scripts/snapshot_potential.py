from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.snapshot_potential(
        trajectory=snakemake.input.trajectory, output=snakemake.output.image, **dict(snakemake.params.items())
    )
