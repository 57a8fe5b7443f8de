# Planned quants (quantize.plans): per model the per-tensor error estimates and calibrated
# sensitivities once, then one recipe per plan (imatrix plan), which rules/quantize.smk
# turns into a quant. Every plan reads the estimates, none writes them: parallel plans
# never race on the file.


rule plan_estimates:
    input:
        model=get_base_model,
        imatrix="results/{m}/imatrix.gguf",
        texts=get_calibration_texts,
    output:
        estimates="results/{m}/plan/estimates.parquet",
    log:
        "logs/{m}/plan/estimates.log",
    benchmark:
        "results/benchmarks/{m}/plan/estimates.tsv"
    conda:
        conda_env()
    threads: PLANNER["threads"]
    resources:
        mem_mb=get_mem_mb("plan_estimates"),
        runtime=get_runtime("plan_estimates"),
    params:
        plans=PLANS,
        settings=PLANNER,
        eval_texts=get_plan_eval_texts,
    script:
        "../scripts/plan_estimates.py"


rule plan:
    input:
        model=get_base_model,
        imatrix="results/{m}/imatrix.gguf",
        estimates="results/{m}/plan/estimates.parquet",
        texts=get_calibration_texts,
    output:
        recipe="results/{m}/plan/{p}.txt",
        sidecar="results/{m}/plan/{p}.txt.json",
    log:
        "logs/{m}/plan/{p}.log",
    benchmark:
        "results/benchmarks/{m}/plan/{p}.tsv"
    conda:
        conda_env()
    threads: PLANNER["threads"]
    resources:
        mem_mb=get_mem_mb("plan"),
        runtime=get_runtime("plan"),
    params:
        plan=get_plan,
        settings=PLANNER,
        eval_texts=get_plan_eval_texts,
        quant_output="results/{m}/quant/{m}-{p}.gguf",
    script:
        "../scripts/plan.py"
