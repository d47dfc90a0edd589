from pathlib import Path

from octastem import stages
from octastem.md.student import validate_stage

with stages.logged(snakemake.log[0], snakemake):
    validate_stage(
        snakemake.input.model,
        str(Path(snakemake.input.split) / "test.xyz"),
        snakemake.output.validation,
        reference=snakemake.params.reference,
        threads=snakemake.threads,
        md_dir=str(Path(snakemake.output.validation).parent / "md_compare"),
        md=dict(snakemake.params.md),
        npt=dict(snakemake.params.npt),
    )
