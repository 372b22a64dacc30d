# KdV: the data stage (training and evaluation are the generic rules of experiment.smk).
#
#   kdv.source: generate   generate_kdv (seeded ETDRK4, parallel with Dask) -> data/kdv.zarr
#   kdv.source: lpsda      import_kdv (LPSDA's HDF5 files, read with h5py)  -> data/kdv.zarr

from smnn.data.kdv.lpsda import KdvLpsdaSettings


if config["kdv"]["source"] == "generate":

    rule generate_kdv:
        output:
            directory(data_path("kdv.zarr")),
        params:
            config=effective_config_path(),
            settings=settings("seed", "kdv.generate"),
            source=config["kdv"]["source"],  # a changed source reruns the data stage
        log:
            results_path("logs", "kdv", "generate.log"),
        threads: config["threads"]
        resources:
            mem_mb=4000,
            runtime=30,
        conda:
            "../../environment.yml"
        shell:
            "smnn generate-kdv --config {params.config} --threads {threads} --out {output} 2>&1 | tee {log}"


if config["kdv"]["source"] == "lpsda":

    rule import_kdv:
        input:
            # no rule writes LPSDA's files: a missing one stops the run at once, naming it
            [
                str(path)
                for path in KdvLpsdaSettings.from_config(
                    Config(config, "configuration")
                ).existing_files()
            ],
        output:
            directory(data_path("kdv.zarr")),
        params:
            config=effective_config_path(),
            settings=settings("kdv.lpsda"),
            source=config["kdv"]["source"],  # a changed source reruns the data stage
        log:
            results_path("logs", "kdv", "import.log"),
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
        conda:
            "../../environment.yml"
        shell:
            "smnn import-kdv --config {params.config} --threads {threads} --out {output} 2>&1 | tee {log}"
