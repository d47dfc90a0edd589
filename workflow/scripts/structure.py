from octastem import stages

with stages.logged(snakemake.log[0]):
    stages.structure(snakemake.output[0], **dict(snakemake.params.items()))
