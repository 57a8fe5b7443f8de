"""The library side of the Snakemake workflow, one module per concern.

Why in the library and not in the rules: a rule only names its files and calls one
function; everything that decides something (which chunks a shard gets, whether shards
may be merged, which GPU a job uses, how much memory a job asks for) is here, importable
and tested without Snakemake. No module here imports Snakemake, and none imports
llama.cpp at import time: the Snakemake process imports them to validate the config,
and a collect job must choose its GPU (``CUDA_VISIBLE_DEVICES``) before llama.cpp
initializes its backend.

- :mod:`~imatrix.workflow.joblog` — a job's output into its log file
- :mod:`~imatrix.workflow.config` — config checks the schema cannot express
- :mod:`~imatrix.workflow.datasets` — dataset files (text, JSONL, Parquet) to text
- :mod:`~imatrix.workflow.shards` — which chunks each collect job takes
- :mod:`~imatrix.workflow.gpu` — one GPU per concurrent job on one machine
- :mod:`~imatrix.workflow.resources` — memory, runtime and GPU requests of the jobs
- :mod:`~imatrix.workflow.steps` — the collect, evaluate and statistics steps
- :mod:`~imatrix.workflow.merge` — shards into the model's imatrix, health-gated
- :mod:`~imatrix.workflow.report` — HTML tables for Snakemake's report
"""
