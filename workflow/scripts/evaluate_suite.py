from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.evaluate_suite(
        weights=snakemake.input.weights,
        table=snakemake.output.table,
        summary=snakemake.output.summary,
        plot=snakemake.output.plot,
        markdown=snakemake.output.markdown,
        threads=snakemake.threads,
        **dict(snakemake.params.items()),
    )
