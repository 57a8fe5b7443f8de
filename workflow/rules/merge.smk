# All shards of all datasets -> the model's imatrix (dataset weights applied), and the
# merged imatrix in the other formats the config asks for.


localrules:
    convert,


rule merge:
    input:
        shards=get_shard_files,
    output:
        imatrix="results/{m}/imatrix.gguf",
    log:
        "logs/{m}/merge.log",
    conda:
        conda_env()
    resources:
        mem_mb=get_mem_mb("merge"),
        runtime=get_runtime("merge"),
    params:
        datasets=get_shard_datasets,
        weights={d: config["datasets"][d]["weight"] for d in DATASETS},
        health=config["health"],
    script:
        "../scripts/merge.py"


rule convert:
    input:
        imatrix="results/{m}/imatrix.gguf",
    output:
        converted="results/{m}/imatrix.{variant}",
    log:
        "logs/{m}/convert.{variant}.log",
    wildcard_constraints:
        variant=r"dat|compat\.gguf",
    conda:
        conda_env()
    params:
        output_format=lambda wildcards: "dat" if wildcards.variant == "dat" else "gguf",
        compat=lambda wildcards: wildcards.variant != "dat",
    script:
        "../scripts/convert.py"
