# Scaling benchmark of the solvers: forward+backward time and peak memory against the number of
# steps and the batch size.


rule benchmark_solver:
    output:
        csv=results_path("benchmark", "bench.csv"),
        table=results_path("benchmark", "bench.md"),
        floors=results_path("benchmark", "floors.csv"),
        plot_steps=report(
            results_path("benchmark", "scaling_T.png"),
            caption="../report/benchmark.rst",
            category="Solver benchmark",
            labels={"figure": "scaling against T"},
        ),
        plot_batch=report(
            results_path("benchmark", "scaling_batch.png"),
            caption="../report/benchmark.rst",
            category="Solver benchmark",
            labels={"figure": "scaling against batch size"},
        ),
        plot_accuracy=report(
            results_path("benchmark", "accuracy_T.png"),
            caption="../report/benchmark.rst",
            category="Solver benchmark",
            labels={"figure": "error against T"},
        ),
    params:
        config=effective_config_path(),
        out=lambda wildcards, output: os.path.dirname(output.csv),
        settings=settings("seed", "threads", "device", "benchmark"),
    log:
        results_path("logs", "benchmark.log"),
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../../environment.yml"
    shell:
        "smnn bench --config {params.config} --threads {threads} --out {params.out} --rule benchmark_solver"
        " 2>&1 | tee {log}"
