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

from imatrix.errors import ImatrixError  # noqa: E402
from imatrix.workflow import resources as job_resources  # noqa: E402
from imatrix.workflow.config import (  # noqa: E402
    canonical_quant_types,
    check_config,
    eval_sets,
    schema_error,
    types_without_imatrix,
)
from imatrix.workflow.datasets import dataset_format  # noqa: E402
from imatrix.workflow.shards import dataset_chunks, shard_count  # noqa: E402

try:
    validate(config, schema="../schemas/config.schema.yaml")
except WorkflowError as exc:
    raise WorkflowError(f"invalid config: {schema_error(exc)}") from None

try:
    check_config(config)
except ImatrixError as exc:
    raise WorkflowError(f"invalid config: {exc}") from None

MODELS = list(config["models"])
DATASETS = list(config["datasets"])
QUANT_TYPES = canonical_quant_types(config["quantize"]["types"])
QUANT_TYPES_NO_IMATRIX = types_without_imatrix(QUANT_TYPES)
COLLECT = config["collect"]
EVALUATE = config["evaluate"]
EVAL_SETS = eval_sets(EVALUATE)


def alternatives(names):
    """A wildcard regex matching exactly these names (and nothing when there are none)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


wildcard_constraints:
    m=alternatives(MODELS),
    d=alternatives(DATASETS),
    s=r"\d+",
    t=alternatives(QUANT_TYPES),


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


def get_dataset_text(wildcards):
    """Plain text of a dataset: text files as they are, JSONL/Parquet extracted first
    (with document boundaries the tokenizer reads the records themselves)."""
    ds = config["datasets"][wildcards.d]
    if ds["boundary"] == "document":
        return ds["path"]
    if dataset_format(ds["path"], ds["format"]) == "text":
        return ds["path"]
    return f"results/datasets/{wildcards.d}.txt"


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
        "format": ds["format"],
        "text_column": ds["text_column"],
    }


def get_dataset_settings(wildcards):
    """How the text of a JSONL/Parquet dataset is extracted."""
    ds = config["datasets"][wildcards.d]
    return {"format": ds["format"], "text_column": ds["text_column"]}


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
    keys = ("n_ctx", "n_batch", "n_ubatch", "process_output", "ppl", "parse_special")
    return {k: COLLECT[k] for k in keys}


def quant_files(m):
    """Every quantized model of model m the config asks for."""
    out = [f"results/{m}/quant/{m}-{t}.gguf" for t in QUANT_TYPES]
    if config["quantize"]["compare_without_imatrix"]:
        out += [
            f"results/{m}/quant/noimatrix/{m}-{t}.gguf" for t in QUANT_TYPES_NO_IMATRIX
        ]
    return out


def get_quant_files(wildcards):
    """The quantized models the evaluation compares with their base."""
    return quant_files(wildcards.m)


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
            f"results/{m}/stats/plots",
            f"results/{m}/report/statistics.html",
        ]
        out += quant_files(m)
        if EVAL_SETS and QUANT_TYPES:
            out += [
                f"results/{m}/eval/summary.parquet",
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
