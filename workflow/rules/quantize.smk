# The base model quantized with the merged imatrix, one job per type; optionally also
# without it (for the types llama.cpp can make without one) to measure the gain.


rule quantize:
    input:
        model=get_base_model,
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
        mem_mb=get_mem_mb("quantize"),
        runtime=get_runtime("quantize"),
    params:
        allow_requantize=config["quantize"]["allow_requantize"],
    script:
        "../scripts/quantize.py"


# The control: the same quantization without the imatrix.
use rule quantize as quantize_noimatrix with:
    input:
        model=get_base_model,
    output:
        model="results/{m}/quant/noimatrix/{m}-{t}.gguf",
    log:
        "logs/{m}/quantize/{t}.noimatrix.log",
    benchmark:
        "results/benchmarks/{m}/quantize/{t}.noimatrix.tsv"
