# The base model quantized with the merged imatrix, one job per type; optionally also
# without it (for the types llama.cpp can make without one) to measure the gain; and
# with the recipe of each plan (rules/plan.smk).


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
        qtype="{t}",
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


# A planned mix: the recipe's types, the ftype its sidecar names (as the sidecar's
# invocation, whose file size the plan predicted to the byte).
use rule quantize as quantize_plan with:
    input:
        model=get_base_model,
        imatrix="results/{m}/imatrix.gguf",
        recipe="results/{m}/plan/{p}.txt",
        sidecar="results/{m}/plan/{p}.txt.json",
    output:
        model="results/{m}/quant/{m}-{p}.gguf",
    log:
        "logs/{m}/quantize/{p}.plan.log",
    benchmark:
        "results/benchmarks/{m}/quantize/{p}.plan.tsv"
    params:
        qtype=None,
        allow_requantize=config["quantize"]["allow_requantize"],
