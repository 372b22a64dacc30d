# Standalone validation of the solvers on linear ODEs with closed-form solutions (no training).


rule standalone:
    output:
        metrics=results_path("standalone", "metrics.json"),
        table=report(
            results_path("standalone", "errors.csv"),
            caption="../report/standalone_table.rst",
            category="Standalone ODEs",
            labels={"figure": "error table (CSV)"},
        ),
        markdown=results_path("standalone", "errors.md"),
        plot=report(
            results_path("standalone", "solutions.png"),
            caption="../report/standalone_plot.rst",
            category="Standalone ODEs",
            labels={"figure": "solutions"},
        ),
    params:
        config=effective_config_path(),
        out=lambda wildcards, output: os.path.dirname(output.metrics),
        settings=settings("threads", "device", "standalone"),
    log:
        results_path("logs", "standalone.log"),
    threads: config["threads"]
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../environment.yml"
    shell:
        "smnn standalone --config {params.config} --threads {threads} --out {params.out} --rule standalone"
        " 2>&1 | tee {log}"
