from octastem import stages

with stages.logged(path=snakemake.log[0], smk=snakemake):
    stages.train_student(
        data=list(snakemake.input.data),
        model=snakemake.output.model,
        split=snakemake.output.split,
        reference=snakemake.params.reference,
        train=dict(snakemake.params.train),
        **dict(snakemake.params.split),
        warm_start=snakemake.input.warm_start or None,
        epochs=snakemake.params.epochs,
        trust_model_file=snakemake.params.trust_model_file,
        threads=snakemake.threads,
    )
