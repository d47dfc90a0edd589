from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.train_cnn(
        list(snakemake.input.shards),
        snakemake.output.weights,
        threads=snakemake.threads,
        **dict(snakemake.params.items()),
    )
