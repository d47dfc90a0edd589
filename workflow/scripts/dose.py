from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.dose(snakemake.input[0], snakemake.output.stem, **dict(snakemake.params.items()))
