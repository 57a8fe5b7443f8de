# Inputs of the collection: the base model of a packaged source, dataset text, tokens.


localrules:
    demo_model,
    dataset_text,
    model_dataset_text,
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


rule generate_dataset:
    input:
        model=get_base_model,
        prompts=get_generate_prompts,
    output:
        data="results/{m}/generated/{d}.jsonl",
    log:
        "logs/{m}/generate/{d}.log",
    benchmark:
        "results/benchmarks/{m}/generate/{d}.tsv"
    conda:
        conda_env()
    # the configured count, whatever --cores is: it is part of what makes the text
    threads: lambda wildcards: get_generate_settings(wildcards)["threads"]
    resources:
        mem_mb=get_mem_mb("generate_dataset"),
        runtime=get_runtime("generate_dataset"),
    params:
        settings=get_generate_settings,
    script:
        "../scripts/generate_dataset.py"


rule model_dataset_text:
    input:
        unpack(get_model_dataset_inputs),
    output:
        text="results/{m}/datasets/{d}.txt",
    log:
        "logs/{m}/datasets/{d}.log",
    conda:
        conda_env()
    params:
        settings=get_model_dataset_settings,
    script:
        "../scripts/model_dataset_text.py"


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
        parse_special=get_parse_special,
        selection=get_selection,
    script:
        "../scripts/tokenize_text.py"
