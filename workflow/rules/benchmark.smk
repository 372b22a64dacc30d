# Scaling benchmark of the solvers: forward+backward time and peak memory against the number of
# steps and the batch size.


rule benchmark_solver:
    output:
        csv=results_path("benchmark", "bench.csv"),
        table=results_path("benchmark", "bench.md"),
        plot_steps=report(
            results_path("benchmark", "scaling_T.png"),
            caption="../report/benchmark.rst",
            category="5. Solver benchmark",
            labels={"figure": "scaling against T"},
        ),
        plot_batch=report(
            results_path("benchmark", "scaling_batch.png"),
            caption="../report/benchmark.rst",
            category="5. Solver benchmark",
            labels={"figure": "scaling against batch size"},
        ),
    params:
        out=lambda wildcards, output: os.path.dirname(output.csv),
        quick="--quick" if config["benchmark"]["quick"] else "",
        methods=",".join(config["benchmark"]["methods"]),
        dtypes=",".join(config["benchmark"]["dtypes"]),
        time_budget=config["benchmark"]["time_budget"],
        device=config["device"],
        tracking_uri=mlflow_tracking_uri(),
        settings=settings("benchmark"),
    log:
        results_path("logs", "benchmark.log"),
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../../environment.yml"
    shell:
        "smnn bench --out {params.out} {params.quick} --methods {params.methods}"
        " --dtypes {params.dtypes} --time-budget {params.time_budget} --threads {threads}"
        " --device {params.device} --mlflow-uri {params.tracking_uri:q} > {log} 2>&1"
