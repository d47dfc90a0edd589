from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.simulate_nanocrystal(
        snakemake.input.trajectory,
        snakemake.output.stem,
        snakemake.output.structure,
        threads=snakemake.threads,
        **dict(snakemake.params.items()),
    )
