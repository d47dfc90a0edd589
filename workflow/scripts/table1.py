from octastem import stages

with stages.logged(snakemake.log[0], snakemake):
    stages.table1(
        list(snakemake.input.fits),
        list(snakemake.input.md),
        snakemake.output.csv,
        snakemake.output.md,
        snakemake.output.html,
        provenance_json=snakemake.output.provenance,
        **dict(snakemake.params.items()),
    )
