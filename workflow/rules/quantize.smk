# The base model quantized with the merged imatrix, one job per type; optionally also
# without it (for the types llama.cpp can make without one) to measure the gain.


rule quantize:
    input:
        model=base_model,
        imatrix="results/{m}/imatrix.gguf",
    output:
        model="results/{m}/quant/{m}-{t}.gguf",
    log:
        "logs/{m}/quantize/{t}.log",
    benchmark:
        "results/benchmarks/{m}/quantize/{t}.tsv"
    conda:
        conda_env()
    threads: config["quantize"]["threads"]
    resources:
        mem_mb=model_memory(2),
        runtime=minutes(60),
    params:
        allow_requantize=config["quantize"]["allow_requantize"],
    script:
        "../scripts/quantize.py"


rule quantize_noimatrix:
    input:
        model=base_model,
    output:
        model="results/{m}/quant/noimatrix/{m}-{t}.gguf",
    log:
        "logs/{m}/quantize/{t}.noimatrix.log",
    benchmark:
        "results/benchmarks/{m}/quantize/{t}.noimatrix.tsv"
    conda:
        conda_env()
    threads: config["quantize"]["threads"]
    resources:
        mem_mb=model_memory(2),
        runtime=minutes(60),
    params:
        allow_requantize=config["quantize"]["allow_requantize"],
    script:
        "../scripts/quantize.py"
