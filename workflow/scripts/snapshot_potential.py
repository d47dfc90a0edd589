from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.snapshot_potential(snakemake.input.trajectory, snakemake.output.image, **dict(snakemake.params.items()))
