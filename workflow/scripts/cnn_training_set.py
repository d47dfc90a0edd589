from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.cnn_training_set(output=snakemake.output.shard, **dict(snakemake.params.items()))
