# The generic stages of every experiment: train a model, evaluate it.
# {experiment} is a registered experiment (smnn.experiments.base); `train` trains a {variant}:
# a solver name (results/{experiment}/{solver}/) or a trained baseline without a solver,
# baseline_<name> (results/{experiment}/baseline_<name>/, e.g. SST's Ada-GVAE), so that
# `snakemake -R train` retrains both. `evaluate` evaluates a solver's model and compares it with
# the baselines. The experiment's own rule file writes the data store both read.


rule train:
    input:
        data=lambda wildcards: experiment_store(wildcards.experiment),
    output:
        model=results_path("{experiment}", "{variant}", "model.pt"),
        metrics=results_path("{experiment}", "{variant}", "train_metrics.json"),
    params:
        config=effective_config_path(),
        out=lambda wildcards, output: os.path.dirname(output.model),
        settings=lambda wildcards: train_settings(wildcards.experiment),
        which=lambda wildcards: variant_option(wildcards.variant),
    log:
        results_path("logs", "{experiment}", "train_{variant}.log"),
    threads: config["threads"]
    resources:
        mem_mb=lambda wildcards: experiment_resource(wildcards.experiment, "train", "mem_mb"),
        runtime=lambda wildcards: experiment_resource(wildcards.experiment, "train", "runtime"),
    conda:
        "../../environment.yml"
    shell:
        "smnn train --experiment {wildcards.experiment} {params.which}"
        " --config {params.config} --threads {threads} --data {input.data} --out {params.out}"
        " --rule train 2>&1 | tee {log}"


rule evaluate:
    input:
        data=lambda wildcards: experiment_store(wildcards.experiment),
        model=results_path("{experiment}", "{solver}", "model.pt"),
        baselines=lambda wildcards: list(baseline_models(wildcards.experiment).values()),
    output:
        metrics=results_path("{experiment}", "{solver}", "eval", "metrics.json"),
        plots=report(
            directory(results_path("{experiment}", "{solver}", "eval", "plots")),
            patterns=["{name}.png"],
            caption="../report/evaluate.rst",
            category="Experiment {experiment}",
            subcategory="solver {solver}",
            labels={"experiment": "{experiment}", "solver": "{solver}", "figure": "{name}"},
        ),
    params:
        config=effective_config_path(),
        out=lambda wildcards, output: os.path.dirname(output.metrics),
        settings=lambda wildcards: evaluate_settings(wildcards.experiment),
        baselines=lambda wildcards: baseline_options(wildcards.experiment),
    log:
        results_path("logs", "{experiment}", "evaluate_{solver}.log"),
    threads: config["threads"]
    resources:
        mem_mb=lambda wildcards: experiment_resource(wildcards.experiment, "evaluate", "mem_mb"),
        runtime=lambda wildcards: experiment_resource(wildcards.experiment, "evaluate", "runtime"),
    conda:
        "../../environment.yml"
    shell:
        "smnn evaluate --experiment {wildcards.experiment} --solver {wildcards.solver}"
        " --config {params.config} --threads {threads} --data {input.data} --model {input.model} --out {params.out}"
        " {params.baselines} --rule evaluate 2>&1 | tee {log}"
