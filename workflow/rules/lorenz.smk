# Lorenz system: discovery of the governing equations (generate -> train per solver -> evaluate).


rule generate_lorenz:
    output:
        directory(data_path("lorenz.zarr")),
    params:
        config=effective_config_path(),
        settings=settings("seed", "lorenz.data"),
    log:
        results_path("logs", "lorenz", "generate.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../environment.yml"
    shell:
        "smnn generate-lorenz --config {params.config} --out {output} > {log} 2>&1"


rule train_lorenz:
    input:
        data=data_path("lorenz.zarr"),
    output:
        model=results_path("lorenz", "{solver}", "model.pt"),
        metrics=results_path("lorenz", "{solver}", "train_metrics.json"),
    params:
        config=effective_config_path(),
        out=lambda wildcards, output: os.path.dirname(output.model),
        settings=settings("seed", "device", "lorenz.data", "lorenz.model", "lorenz.train"),
    log:
        results_path("logs", "lorenz", "train_{solver}.log"),
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=720,
    conda:
        "../../environment.yml"
    shell:
        "smnn train --experiment lorenz --solver {wildcards.solver} --config {params.config}"
        " --data {input.data} --out {params.out} --rule train_lorenz > {log} 2>&1"


rule evaluate_lorenz:
    input:
        data=data_path("lorenz.zarr"),
        model=results_path("lorenz", "{solver}", "model.pt"),
    output:
        metrics=results_path("lorenz", "{solver}", "eval", "metrics.json"),
        plots=report(
            directory(results_path("lorenz", "{solver}", "eval", "plots")),
            patterns=["{name}.png"],
            caption="../report/lorenz.rst",
            category="2. Lorenz",
            subcategory="{solver}",
            labels={"solver": "{solver}", "figure": "{name}"},
        ),
    params:
        config=effective_config_path(),
        out=lambda wildcards, output: os.path.dirname(output.metrics),
        settings=settings("seed", "lorenz.evaluate"),
    log:
        results_path("logs", "lorenz", "evaluate_{solver}.log"),
    threads: config["threads"]
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../environment.yml"
    shell:
        "smnn evaluate --experiment lorenz --solver {wildcards.solver} --config {params.config}"
        " --data {input.data} --model {input.model} --out {params.out} > {log} 2>&1"
