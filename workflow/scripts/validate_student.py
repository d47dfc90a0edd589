from octastem import stages

with stages.logged(path=snakemake.log[0], smk=snakemake):
    stages.validate_student(
        model=snakemake.input.model,
        split=snakemake.input.split,
        validation=snakemake.output.validation,
        reference=snakemake.params.reference,
        md=dict(snakemake.params.md),
        npt=dict(snakemake.params.npt),
        trust_model_file=snakemake.params.trust_model_file,
        threads=snakemake.threads,
    )
