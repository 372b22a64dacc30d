# Sea surface temperature: the data stages and the long-sequence study (training and evaluation
# are the generic rules of experiment.smk; the Ada-GVAE baseline is `train_baseline`).
#
#   sst.source: noaa       download_sst   -> data/raw/sst/*.nc (+ .sha256) -> preprocess_sst
#   sst.source: synthetic  synthesize_sst -> data/raw/sst/*.nc            -> preprocess_sst
#   sst.source: file       your files at sst.files.*                      -> preprocess_sst
#
# preprocess_sst writes data/sst.zarr (xarray + Dask, out of core), which train/evaluate read.

from smnn.data.sst.layout import sst_raw_paths


def sst_raw_file(which, must_exist=False):
    """The raw NetCDF file `which` ("sst" or "mask") of the config (smnn.data.sst.layout)."""
    sst, mask = sst_raw_paths(Config(config, source="configuration"))
    path = {"sst": sst, "mask": mask}[which]
    if must_exist and not path.is_file():
        raise WorkflowError(
            f"sst.source is 'file' but the {which} file {path} (sst.files.{which}) does not "
            "exist: place the NOAA file there (or point sst.files at it), or set sst.source to "
            "noaa (download) or synthetic (offline)"
        )
    return str(path)



if config["sst"]["source"] == "synthetic":

    rule synthesize_sst:
        output:
            sst=sst_raw_file("sst"),
            mask=sst_raw_file("mask"),
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
            "smnn synthesize-sst --config {params.config} 2>&1 | tee {log}"


if config["sst"]["source"] == "noaa":

    rule download_sst:
        output:
            sst=sst_raw_file("sst"),
            mask=sst_raw_file("mask"),
            sst_sha256=sst_raw_file("sst") + ".sha256",
            mask_sha256=sst_raw_file("mask") + ".sha256",
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
            "smnn download-sst --config {params.config} 2>&1 | tee {log}"


rule preprocess_sst:
    input:
        sst=sst_raw_file("sst", must_exist=config["sst"]["source"] == "file"),
        mask=sst_raw_file("mask", must_exist=config["sst"]["source"] == "file"),
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
        "smnn preprocess-sst --config {params.config} --sst {input.sst} --mask {input.mask}"
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
        "smnn sst-scaling --config {params.config} --out {params.out} --rule sst_scaling"
        " 2>&1 | tee {log}"
