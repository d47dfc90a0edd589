from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.table1_plot(csv=snakemake.input.csv, output=snakemake.output.png)
