from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.figure(image_path=snakemake.input.image, table=snakemake.input.table, output=snakemake.output.png)
