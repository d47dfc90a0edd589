from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.table1_plot(snakemake.input.csv, snakemake.output.png)
