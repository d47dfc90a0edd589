from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.reconstruct(
        input_path=snakemake.input.stem,
        output=snakemake.output.image,
        method=snakemake.wildcards.method,
        weights=snakemake.input.weights or None,
        **dict(snakemake.params.items()),
    )
