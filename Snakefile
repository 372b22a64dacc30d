# smnn workflow: data -> Zarr -> train -> evaluate -> plots/report, every run recorded in MLflow.
#
#   snakemake --cores 2                                   demo scale (config/config.yaml)
#   snakemake --profile slurm --configfile config/paper.yaml   published settings on a cluster
#
# This file only loads and validates the config, includes the rule files and names the targets.
# Every rule calls one `smnn` subcommand; see README.md and config/README.md. The experiments
# (their data rules, config sections and targets) come from the registry smnn.experiments.base.

from snakemake.utils import min_version

min_version("8.20")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


# Stops the run before any job, naming every wrong, unknown or missing key.
validate_workflow_config(config)


report: "workflow/report/workflow.rst"


wildcard_constraints:
    solver="|".join(SOLVERS),
    experiment="|".join(EXPERIMENTS),
    variant="|".join(VARIANTS),


include: "workflow/rules/standalone.smk"
include: "workflow/rules/benchmark.smk"


for _rule_file in experiment_rule_files():

    include: _rule_file


include: "workflow/rules/experiment.smk"


localrules:
    all,


rule all:
    default_target: True
    input:
        all_targets(),


onsuccess:
    print_summary()
