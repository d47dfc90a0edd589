from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.evaluate_cnn(
        weights=snakemake.input.weights, metrics=snakemake.output.metrics, **dict(snakemake.params.items())
    )
