# Per-tensor and per-layer statistics of the merged imatrix: Parquet tables and plots;
# the expert coverage (tokens per expert, merged and per dataset) of MoE models.


localrules:
    report_statistics,
    convergence,


rule stats:
    input:
        imatrix="results/{m}/imatrix.gguf",
    output:
        tensors="results/{m}/stats/tensors.parquet",
        layers="results/{m}/stats/layers.parquet",
        plots=report(
            directory("results/{m}/stats/plots"),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category="Imatrix statistics",
            subcategory="{m}",
            labels={"model": "{m}", "plot": "{name}"},
        ),
    log:
        "logs/{m}/stats.log",
    conda:
        conda_env()
    resources:
        mem_mb=get_mem_mb("stats"),
        runtime=get_runtime("stats"),
    script:
        "../scripts/stats.py"


rule coverage:
    input:
        imatrix="results/{m}/imatrix.gguf",
        shards=get_shard_files,
    output:
        coverage="results/{m}/stats/coverage.parquet",
    log:
        "logs/{m}/coverage.log",
    conda:
        conda_env()
    resources:
        mem_mb=get_mem_mb("coverage"),
        runtime=get_runtime("coverage"),
    params:
        datasets=get_shard_datasets,
    script:
        "../scripts/coverage.py"


rule report_statistics:
    input:
        tensors="results/{m}/stats/tensors.parquet",
        layers="results/{m}/stats/layers.parquet",
        coverage="results/{m}/stats/coverage.parquet",
        convergence="results/{m}/stats/convergence.parquet",
    output:
        html=report(
            "results/{m}/report/statistics.html",
            caption="../report/statistics.rst",
            category="Imatrix statistics",
            subcategory="{m}",
            labels={"model": "{m}", "table": "tensors and layers"},
        ),
    log:
        "logs/{m}/report_statistics.log",
    conda:
        conda_env()
    params:
        min_expert_tokens=config["health"]["min_expert_tokens"],
    script:
        "../scripts/report_statistics.py"


rule convergence:
    input:
        shards=get_shard_files,
    output:
        table="results/{m}/stats/convergence.parquet",
        plot=report(
            "results/{m}/stats/convergence.png",
            caption="../report/convergence.rst",
            category="Imatrix statistics",
            subcategory="{m}",
            labels={"model": "{m}", "plot": "convergence"},
        ),
    log:
        "logs/{m}/convergence.log",
    conda:
        conda_env()
    params:
        datasets=get_shard_datasets,
        eps=convergence_eps(),
    script:
        "../scripts/convergence.py"
