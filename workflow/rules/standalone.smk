# Standalone validation of the solvers on linear ODEs with closed-form solutions (no training).


rule standalone:
    output:
        metrics=results_path("standalone", "metrics.json"),
        table=report(
            results_path("standalone", "errors.csv"),
            caption="../report/standalone_table.rst",
            category="1. Standalone ODEs",
            labels={"figure": "error table (CSV)"},
        ),
        markdown=results_path("standalone", "errors.md"),
        plot=report(
            results_path("standalone", "solutions.png"),
            caption="../report/standalone_plot.rst",
            category="1. Standalone ODEs",
            labels={"figure": "solutions"},
        ),
    params:
        out=lambda wildcards, output: os.path.dirname(output.metrics),
    log:
        results_path("logs", "standalone.log"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../environment.yml"
    shell:
        "smnn standalone --out {params.out} > {log} 2>&1"
