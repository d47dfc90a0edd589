from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.evaluate_cnn(snakemake.input.weights, snakemake.output.metrics, **dict(snakemake.params.items()))
