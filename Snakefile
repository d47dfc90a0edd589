# octastem: the octahedral network of FAPbBr3 from low-dose 4D-STEM and MACE molecular dynamics.
# One command regenerates the study's Table 1:  snakemake --cores 2   (see README.md).

from snakemake.utils import min_version, validate

min_version("9.0")


# A --configfile given on the command line replaces the embedded default as a whole (the paper
# preset is complete on its own); --config key=value overrides single keys of the default.
if not workflow.overwrite_configfiles:

    configfile: f"{workflow.basedir}/config/config.yaml"



validate(config, "config/schema.yaml", set_default=True)


include: "workflow/rules/common.smk"
include: "workflow/rules/structure.smk"
include: "workflow/rules/md.smk"
include: "workflow/rules/student.smk"
include: "workflow/rules/potential.smk"
include: "workflow/rules/stem.smk"
include: "workflow/rules/cnn.smk"
include: "workflow/rules/fit.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        "results/report/table1.csv",
        "results/report/table1.md",
        "results/report/table1.html",
        "results/report/figures/table1.png",
        md_report_figures(),
        expand("results/report/figures/{name}.png", name=fit_names()),
