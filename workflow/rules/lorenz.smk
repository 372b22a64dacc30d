# Lorenz system: the data stage (training and evaluation are the generic rules of experiment.smk).


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
        "smnn generate-lorenz --config {params.config} --threads {threads} --out {output} 2>&1 | tee {log}"
