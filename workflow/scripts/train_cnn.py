from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.train_cnn(
        shards=list(snakemake.input.shards),
        weights_output=snakemake.output.weights,
        threads=snakemake.threads,
        **dict(snakemake.params.items()),
    )
