# Sea surface temperature: the data stages and the long-sequence study (training and evaluation
# are the generic rules of experiment.smk; `train` also trains the Ada-GVAE baseline).
#
#   sst.source: noaa       download_sst   -> data/raw/sst/*.nc (+ .sha256) -> preprocess_sst
#   sst.source: synthetic  synthesize_sst -> data/raw/sst/*.nc            -> preprocess_sst
#   sst.source: file       your files at sst.files.*                      -> preprocess_sst
#
# preprocess_sst writes data/sst.zarr (xarray + Dask, out of core), which train/evaluate read.

from smnn.data.sst.layout import sst_raw_file

SST_CONFIG = Config(config, source="configuration")
SST_FILES_GIVEN = config["sst"]["source"] == "file"  # no rule writes them: they must exist


if config["sst"]["source"] == "synthetic":

    rule synthesize_sst:
        output:
            sst=str(sst_raw_file(SST_CONFIG, "sst")),
            mask=str(sst_raw_file(SST_CONFIG, "mask")),
        params:
            config=effective_config_path(),
            settings=settings("seed", "sst.synthetic"),
        log:
            results_path("logs", "sst", "synthesize.log"),
        threads: 1
        resources:
            mem_mb=2000,
            runtime=30,
        conda:
            "../../environment.yml"
        shell:
            "smnn synthesize-sst --config {params.config} --threads {threads} 2>&1 | tee {log}"


if config["sst"]["source"] == "noaa":

    rule download_sst:
        output:
            sst=str(sst_raw_file(SST_CONFIG, "sst")),
            mask=str(sst_raw_file(SST_CONFIG, "mask")),
            sst_sha256=f"{sst_raw_file(SST_CONFIG, 'sst')}.sha256",
            mask_sha256=f"{sst_raw_file(SST_CONFIG, 'mask')}.sha256",
        params:
            config=effective_config_path(),
        log:
            results_path("logs", "sst", "download.log"),
        threads: 1
        resources:
            mem_mb=1000,
            runtime=120,
        conda:
            "../../environment.yml"
        shell:
            "smnn download-sst --config {params.config} --threads {threads} 2>&1 | tee {log}"


rule preprocess_sst:
    input:
        sst=str(sst_raw_file(SST_CONFIG, "sst", must_exist=SST_FILES_GIVEN)),
        mask=str(sst_raw_file(SST_CONFIG, "mask", must_exist=SST_FILES_GIVEN)),
    output:
        directory(data_path("sst.zarr")),
    params:
        config=effective_config_path(),
        settings=settings("sst.source", "sst.preprocess"),
    log:
        results_path("logs", "sst", "preprocess.log"),
    threads: config["threads"]
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../environment.yml"
    shell:
        "smnn preprocess-sst --config {params.config} --threads {threads} --sst {input.sst} --mask {input.mask}"
        " --out {output} 2>&1 | tee {log}"


rule sst_scaling:
    output:
        csv=results_path("sst", "scaling", "scaling.csv"),
        table=results_path("sst", "scaling", "scaling.md"),
        plot=report(
            results_path("sst", "scaling", "scaling.png"),
            caption="../report/sst_scaling.rst",
            category="Experiment sst",
            subcategory="long-sequence study",
        ),
    params:
        config=effective_config_path(),
        out=lambda wildcards, output: os.path.dirname(output.csv),
        settings=settings("seed", "device", "threads", "sst.model", "sst.scaling"),
    log:
        results_path("logs", "sst", "scaling.log"),
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../../environment.yml"
    shell:
        "smnn sst-scaling --config {params.config} --threads {threads} --out {params.out} --rule sst_scaling"
        " 2>&1 | tee {log}"
