# Helpers shared by all rules: config validation, wildcard constraints, input functions
# (get_*), resources and the default target. Everything that needs more than a lookup
# lives in the library (imatrix.workflow), where it is tested without Snakemake.

import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# The workflow runs the library of its own checkout, whichever environment runs Snakemake
# (workflow.basedir is the directory of workflow/Snakefile).
sys.path.insert(0, str(Path(workflow.basedir).parent / "src"))

from imatrix.convergence import DEFAULT_EPS  # noqa: E402
from imatrix.errors import ImatrixError  # noqa: E402
from imatrix.workflow import resources as job_resources  # noqa: E402
from imatrix.workflow.config import (  # noqa: E402
    canonical_quant_types,
    check_config,
    check_until_converged,
    eval_sets,
    schema_error,
    types_without_imatrix,
)
from imatrix.workflow.datasets import dataset_format  # noqa: E402
from imatrix.workflow import model_datasets  # noqa: E402
from imatrix.workflow.shards import dataset_chunks, shard_count  # noqa: E402

try:
    validate(config, schema="../schemas/config.schema.yaml")
except WorkflowError as exc:
    raise WorkflowError(f"invalid config: {schema_error(exc)}") from None

# The chat template check loads model vocabularies: only in the main process, not in
# each cluster job's reading of the workflow (the job rendering a chat dataset checks
# the same itself).
try:
    check_config(config, check_chat=workflow.is_main_process)
except ImatrixError as exc:
    raise WorkflowError(f"invalid config: {exc}") from None

MODELS = list(config["models"])
DATASETS = list(config["datasets"])
QUANT_TYPES = canonical_quant_types(config["quantize"]["types"])
QUANT_TYPES_NO_IMATRIX = types_without_imatrix(QUANT_TYPES)
COLLECT = config["collect"]
EVALUATE = config["evaluate"]
PLANS = config["quantize"]["plans"]
PLANNER = config["quantize"]["planner"]
PLAN_NAMES = [p["name"] for p in PLANS]
EVAL_SETS = eval_sets(EVALUATE)


def alternatives(names):
    """A wildcard regex matching exactly these names (and nothing when there are none)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


wildcard_constraints:
    m=alternatives(MODELS),
    d=alternatives(DATASETS),
    s=r"\d+",
    t=alternatives(QUANT_TYPES),
    p=alternatives(PLAN_NAMES),


def conda_env(gpu=False):
    """Conda environment file of a rule: the configured llama.cpp build for rules that
    may run a model on a GPU (collect, evaluate), the CPU build for everything else."""
    build = config["llama_cpp_build"] if gpu else "cpu"
    return f"../envs/{build}.yaml"


def get_base_model(wildcards):
    """The model that gets calibrated and quantized: the configured GGUF, or the F16 base
    the workflow makes from a packaged source."""
    model = config["models"][wildcards.m]
    if "path" in model:
        return model["path"]
    return f"results/{wildcards.m}/base/{wildcards.m}-F16.gguf"


def get_dataset_path(wildcards):
    """The dataset file as configured (text, JSONL or Parquet)."""
    return config["datasets"][wildcards.d]["path"]


def plain_text(m, d):
    """Plain text of dataset d for model m: text files as they are, JSONL/Parquet
    extracted first, chat and generated datasets per model."""
    ds = config["datasets"][d]
    if model_datasets.is_model_bound(ds):
        return model_datasets.model_text_path(m, d)
    if dataset_format(ds["path"], ds["format"]) == "text":
        return ds["path"]
    return f"results/datasets/{d}.txt"


def get_dataset_text(wildcards):
    """What the tokenizer reads for a dataset: its plain text, or with document
    boundaries a JSONL/Parquet file's records themselves."""
    ds = config["datasets"][wildcards.d]
    if ds["boundary"] == "document" and not model_datasets.is_model_bound(ds):
        return ds["path"]
    return plain_text(wildcards.m, wildcards.d)


def get_selection(wildcards):
    """How the tokenizer chooses a dataset's chunks (imatrix.sampling.Selection, and
    where a document-boundary dataset's records are). False for llama-imatrix's whole
    stream: it does not depend on n_ctx, and Snakemake keeps params as a set of values,
    so False leaves the params of runs made before this option unchanged (no rerun)."""
    ds = config["datasets"][wildcards.d]
    if ds["boundary"] == "stream" and ds["sample"] is None:
        return False
    sample = ds["sample"] or {}
    return {
        "n_ctx": COLLECT["n_ctx"],
        "boundary": ds["boundary"],
        "chunks": sample.get("chunks"),
        "seed": sample.get("seed", 0),
        # a chat or generated dataset reaches the tokenizer as the model's plain text
        "format": "text" if model_datasets.is_model_bound(ds) else ds["format"],
        "text_column": ds["text_column"],
    }


def get_dataset_settings(wildcards):
    """How the text of a JSONL/Parquet dataset is extracted."""
    ds = config["datasets"][wildcards.d]
    return {"format": ds["format"], "text_column": ds["text_column"]}


def get_model_dataset_inputs(wildcards):
    """Inputs of a model's text of a chat dataset (the file and the model, whose
    template renders it) or of a generated one (the model's JSONL)."""
    ds = config["datasets"][wildcards.d]
    if model_datasets.is_chat(ds):
        return {"data": ds["path"], "model": get_base_model(wildcards)}
    return {"data": model_datasets.generated_path(wildcards.m, wildcards.d)}


def get_model_dataset_settings(wildcards):
    """What decides a model's text of a chat or generated dataset (a change reruns it)."""
    ds = config["datasets"][wildcards.d]
    return {"format": ds["format"], "template": ds.get("template")}


def get_generate_prompts(wildcards):
    return config["datasets"][wildcards.d]["generate"]["prompts"]


def get_generate_settings(wildcards):
    """tokens, seed, temperature and threads of a generated dataset."""
    return config["datasets"][wildcards.d]["generate"]


def get_parse_special(wildcards):
    """Special tokens parsed when tokenizing: always for chat data (turn markers)."""
    ds = config["datasets"][wildcards.d]
    return model_datasets.parse_special(ds, COLLECT["parse_special"])


def n_shards(m, d):
    """Collect jobs of dataset d for model m. With chunks_per_shard this depends on the
    token count, so it waits for the tokenize checkpoint of (m, d)."""
    if COLLECT["chunks_per_shard"] is None:
        return COLLECT["shards"]
    tokens = checkpoints.tokenize.get(m=m, d=d).output.tokens
    return shard_count(
        dataset_chunks(tokens, COLLECT["n_ctx"], config["datasets"][d]["chunks"]),
        chunks_per_shard=COLLECT["chunks_per_shard"],
    )


def model_shards(m):
    """All partial imatrices of model m, dataset by dataset in config order."""
    return [
        f"results/{m}/shards/{d}/{s}.gguf"
        for d in DATASETS
        for s in range(n_shards(m, d))
    ]


def get_dataset_chunks(wildcards):
    """The configured chunk limit of a dataset (None: all its chunks)."""
    return config["datasets"][wildcards.d]["chunks"]


def get_shard_files(wildcards):
    """Every partial imatrix the merge of model m combines."""
    return model_shards(wildcards.m)


def get_shard_datasets(wildcards):
    """The dataset name of each file of get_shard_files, in the same order."""
    return [d for d in DATASETS for _ in range(n_shards(wildcards.m, d))]


def collect_settings():
    """The collection settings a shard depends on (a change reruns the collection)."""
    keys = (
        "n_ctx",
        "n_batch",
        "n_ubatch",
        "process_output",
        "ppl",
        "parse_special",
        "until_converged",
    )
    return {k: COLLECT[k] for k in keys}


def convergence_eps():
    """The threshold drawn in the convergence plot: the stop rule's, else stats' default."""
    stop = check_until_converged(COLLECT["until_converged"])
    return DEFAULT_EPS if stop is None else stop.eps


def quant_files(m):
    """Every quantized model of model m the config asks for: stock types, plans and
    the comparison without the imatrix."""
    out = [f"results/{m}/quant/{m}-{t}.gguf" for t in QUANT_TYPES]
    out += [f"results/{m}/quant/{m}-{p}.gguf" for p in PLAN_NAMES]
    if config["quantize"]["compare_without_imatrix"]:
        out += [
            f"results/{m}/quant/noimatrix/{m}-{t}.gguf" for t in QUANT_TYPES_NO_IMATRIX
        ]
    return out


def get_quant_files(wildcards):
    """The quantized models the evaluation compares with their base."""
    return quant_files(wildcards.m)


def get_quant_recipes(wildcards):
    """Quantized model -> the name of the plan it was made with (stock types: none)."""
    m = wildcards.m
    return {f"results/{m}/quant/{m}-{p}.gguf": p for p in PLAN_NAMES}


def get_calibration_texts(wildcards):
    """The text of every dataset: what the plans calibrate their KLD predictions on."""
    return [plain_text(wildcards.m, d) for d in DATASETS]


def get_plan_eval_texts(wildcards):
    """The held-out texts, which a plan refuses to calibrate on."""
    return list(EVAL_SETS.values())


def get_plan(wildcards):
    """The configured plan of a job (name and budget)."""
    return next(p for p in PLANS if p["name"] == wildcards.p)


def get_eval_texts(wildcards):
    """The held-out texts of the evaluation, set by set (the rule is only targeted when
    there is one); their names are EVAL_SETS' keys in the same order."""
    return list(EVAL_SETS.values())


def imatrix_files(m):
    """The merged imatrix in every configured format."""
    formats = config["output_formats"]
    out = [f"results/{m}/imatrix.gguf"]
    if "dat" in formats:
        out.append(f"results/{m}/imatrix.dat")
    if "gguf-compat" in formats:
        out.append(f"results/{m}/imatrix.compat.gguf")
    return out


def get_all_targets(wildcards):
    """Everything the config asks for, model by model (the default target).

    The shards are targets too: they are kept as the unit of resume, and Snakemake
    regenerates a deleted intermediate file only when something asks for it."""
    out = []
    for m in MODELS:
        out += model_shards(m)
        out += imatrix_files(m)
        out += [
            f"results/{m}/stats/tensors.parquet",
            f"results/{m}/stats/layers.parquet",
            f"results/{m}/stats/coverage.parquet",
            f"results/{m}/stats/plots",
            f"results/{m}/stats/convergence.parquet",
            f"results/{m}/stats/convergence.png",
            f"results/{m}/report/statistics.html",
        ]
        out += quant_files(m)
        if EVAL_SETS and QUANT_TYPES:
            out += [
                f"results/{m}/eval/summary.parquet",
                f"results/{m}/eval/kld_vs_size.png",
                f"results/{m}/report/evaluation.html",
            ]
    return out


def execution_setting(value):
    """A params entry that says how a job runs, not what it produces (`ngl`,
    `output_frequency`): changing it must not rerun finished jobs. Snakemake leaves params
    derived from a job's resources out of its params rerun trigger, hence the argument.
    """
    return lambda wildcards, resources: value


# Resources: only the portable ones (gpu, mem_mb, runtime, threads), decided by the
# library (imatrix.workflow.resources) for every executor; partition, account, GPU model
# and signals are site settings and live in profiles/slurm.


def get_gpu(ngl):
    """GPU request of a job offloading `ngl` layers: one device if any, else none."""
    return job_resources.gpu_count(ngl)


def get_mem_mb(step):
    """mem_mb of a job of `step`, from the size of its inputs and the attempt."""
    return lambda wildcards, input, attempt: job_resources.mem_mb(
        step, input.size_mb, attempt
    )


def get_runtime(step):
    """runtime (minutes) of a job of `step` on its attempt."""
    return lambda wildcards, attempt: job_resources.runtime_min(step, attempt)
