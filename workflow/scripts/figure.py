from octastem import stages

with stages.logged(snakemake.log[0]):
    stages.figure(snakemake.input.image, snakemake.input.table, snakemake.output.png)
