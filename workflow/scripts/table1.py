from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.table1(
        fits=list(snakemake.input.fits),
        md_summaries=list(snakemake.input.md),
        csv=snakemake.output.csv,
        md_path=snakemake.output.md,
        html_path=snakemake.output.html,
        provenance_json=snakemake.output.provenance,
        comparisons_csv=snakemake.output.comparisons,
        # the known-truth suite's table when there is one: the report states the method bias from it
        suite_table=snakemake.input.suite[0] if snakemake.input.suite else None,
        sensitivity_table=snakemake.input.sensitivity[0] if snakemake.input.sensitivity else None,
        ingest_summaries=dict(
            zip([s for s, v in snakemake.params.samples.items() if "raw" in v], snakemake.input.ingest)
        ),
        # each sample's reconstructed dataset (in the order of samples), whose averaging the method check matches
        stems=dict(zip(snakemake.params.samples, snakemake.input.stem)),
        **dict(snakemake.params.items()),
    )
