from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.structure(output=snakemake.output[0], **dict(snakemake.params.items()))
