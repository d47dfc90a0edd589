from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.figure(snakemake.input.image, snakemake.input.table, snakemake.output.png)
