from octastem import stages

with stages.logged(snakemake.log[0]):
    stages.md_summary(snakemake.input.trajectory, snakemake.output.summary, **dict(snakemake.params.items()))
