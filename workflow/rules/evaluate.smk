# Every quantized model of a model against its base on the held-out text.


localrules:
    report_evaluation,
    plot_evaluation,


rule evaluate:
    input:
        base=get_base_model,
        quants=get_quant_files,
        texts=get_eval_texts,
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
        gpu=get_gpu(EVALUATE["ngl"]),
        mem_mb=get_mem_mb("evaluate"),
        runtime=get_runtime("evaluate"),
    params:
        recipes=get_quant_recipes,
        sets=list(EVAL_SETS),
        n_ctx=EVALUATE["n_ctx"],
        chunks=EVALUATE["chunks"],
        ngl=execution_setting(EVALUATE["ngl"]),
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


rule plot_evaluation:
    input:
        summary="results/{m}/eval/summary.parquet",
    output:
        plot=report(
            "results/{m}/eval/kld_vs_size.png",
            caption="../report/kld_vs_size.rst",
            category="Quantization",
            subcategory="{m}",
            labels={"model": "{m}", "plot": "KLD vs size"},
        ),
    log:
        "logs/{m}/plot_evaluation.log",
    conda:
        conda_env()
    script:
        "../scripts/plot_evaluation.py"
