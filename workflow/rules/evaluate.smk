# Every quantized model of a model against its base on the held-out text.


localrules:
    report_evaluation,


rule evaluate:
    input:
        base=base_model,
        quants=lambda wildcards: quant_files(wildcards.m),
        text=lambda wildcards: EVALUATE["text"],
    output:
        summary="results/{m}/eval/summary.parquet",
    log:
        "logs/{m}/evaluate.log",
    benchmark:
        "results/benchmarks/{m}/evaluate.tsv"
    conda:
        conda_env(gpu=True)
    threads: EVALUATE["threads"]
    resources:
        gpu=gpu_count(EVALUATE["ngl"]),
        mem_mb=model_memory(1),
        runtime=minutes(60),
    params:
        n_ctx=EVALUATE["n_ctx"],
        chunks=EVALUATE["chunks"],
    script:
        "../scripts/evaluate.py"


rule report_evaluation:
    input:
        summary="results/{m}/eval/summary.parquet",
    output:
        html=report(
            "results/{m}/report/evaluation.html",
            caption="../report/evaluation.rst",
            category="Quantization",
            subcategory="{m}",
            labels={"model": "{m}", "table": "evaluation"},
        ),
    log:
        "logs/{m}/report_evaluation.log",
    conda:
        conda_env()
    script:
        "../scripts/report_evaluation.py"
