from octastem import stages

with stages.logged(path=snakemake.log[0], smk=snakemake):
    stages.student_data(
        data=snakemake.output.data,
        summary=snakemake.output.summary,
        reference=snakemake.params.reference,
        sampling=dict(snakemake.params["round"]),
        driver=snakemake.input.driver or None,
        trust_model_file=snakemake.params.trust_model_file,
        threads=snakemake.threads,
    )
