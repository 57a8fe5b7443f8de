# Inputs of the collection: the base model of a packaged source, dataset text, tokens.


localrules:
    demo_model,
    dataset_text,
    tokenize,


rule demo_model:
    output:
        model="resources/gemma-3-270m-q4_k_m.gguf",
    log:
        "logs/resources/demo_model.log",
    conda:
        conda_env()
    script:
        "../scripts/demo_model.py"


rule base_model:
    input:
        model="resources/gemma-3-270m-q4_k_m.gguf",
    output:
        model="results/{m}/base/{m}-F16.gguf",
    log:
        "logs/{m}/base_model.log",
    benchmark:
        "results/benchmarks/{m}/base_model.tsv"
    conda:
        conda_env()
    threads: config["quantize"]["threads"]
    resources:
        mem_mb=get_mem_mb("base_model"),
        runtime=get_runtime("base_model"),
    script:
        "../scripts/base_model.py"


rule dataset_text:
    input:
        data=get_dataset_path,
    output:
        text="results/datasets/{d}.txt",
    log:
        "logs/datasets/{d}.log",
    conda:
        conda_env()
    params:
        settings=get_dataset_settings,
    script:
        "../scripts/dataset_text.py"


checkpoint tokenize:
    input:
        model=get_base_model,
        text=get_dataset_text,
    output:
        tokens="results/{m}/tokens/{d}.npy",
        meta="results/{m}/tokens/{d}.json",
    log:
        "logs/{m}/tokenize/{d}.log",
    conda:
        conda_env()
    params:
        parse_special=COLLECT["parse_special"],
        selection=get_selection,
    script:
        "../scripts/tokenize_text.py"
