# One partial imatrix per model x dataset x shard: a contiguous range of the dataset's
# chunks. The unit of scheduling (a GPU job on a cluster) and of resume: a killed job
# leaves <shard>.checkpoint beside its output and continues from it when rerun.


rule collect:
    input:
        model=get_base_model,
        tokens="results/{m}/tokens/{d}.npy",
        meta="results/{m}/tokens/{d}.json",
    output:
        shard="results/{m}/shards/{d}/{s}.gguf",
    log:
        "logs/{m}/collect/{d}/{s}.log",
    benchmark:
        "results/benchmarks/{m}/collect/{d}/{s}.tsv"
    conda:
        conda_env(gpu=True)
    threads: COLLECT["threads"]
    resources:
        gpu=get_gpu(COLLECT["ngl"]),
        mem_mb=get_mem_mb("collect"),
        runtime=get_runtime("collect"),
    params:
        settings=collect_settings(),
        shards=COLLECT["shards"],
        chunks_per_shard=COLLECT["chunks_per_shard"],
        chunks=get_dataset_chunks,
        ngl=execution_setting(COLLECT["ngl"]),
        output_frequency=execution_setting(COLLECT["output_frequency"]),
    script:
        "../scripts/collect.py"
