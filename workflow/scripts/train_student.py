from octastem import stages
from octastem.md.student import train_stage

with stages.logged(snakemake.log[0], snakemake):
    train_stage(
        list(snakemake.input.data),
        snakemake.output.model,
        snakemake.output.split,
        reference=snakemake.params.reference,
        threads=snakemake.threads,
        warm_start=snakemake.input.warm_start or None,
        epochs=snakemake.params.epochs,
        **dict(snakemake.params.split),
        **dict(snakemake.params.train),
    )
