# smnn workflow: data -> Zarr -> train -> evaluate -> plots/report, every run recorded in MLflow.
#
#   snakemake --cores 2                                   demo scale (config/config.yaml)
#   snakemake --profile slurm --configfile config/paper.yaml   published settings on a cluster
#
# This file only loads and validates the config, includes the rule files and names the targets.
# Every rule calls one `smnn` subcommand; see README.md and config/README.md.

from snakemake.utils import min_version, validate

min_version("8.20")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


# Stops the run before any job, naming every wrong, unknown or missing key.
check_config(config)
validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


wildcard_constraints:
    solver="|".join(SOLVERS),


include: "workflow/rules/standalone.smk"
include: "workflow/rules/benchmark.smk"
include: "workflow/rules/lorenz.smk"


localrules:
    all,


rule all:
    default_target: True
    input:
        all_targets(),
