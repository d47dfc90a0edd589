from octastem import stages
from octastem.md.student import data_stage

with stages.logged(snakemake.log[0], snakemake):
    r = dict(snakemake.params["round"])
    r.pop("epochs", None)  # a training setting of the round
    data_stage(
        snakemake.output.data,
        snakemake.output.summary,
        reference=snakemake.params.reference,
        runs=r.pop("runs"),
        driver=snakemake.input.driver or None,
        threads=snakemake.threads,
        **r,
    )
