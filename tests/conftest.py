"""Shared fixtures: tiny generated models, calibration text, and llama.cpp's own tools;
and the test tiers.

The llama.cpp binaries are found by :func:`imatrix.reference.tools_dir` (an explicit
``$IMATRIX_LLAMA_BIN``, else scripts/build-llama-tools.sh builds them from the source
vendored in the pinned llama-cpp-python, cached under ~/.cache) and checked to be that
llama.cpp (:func:`imatrix.reference.check_pinned`): parity with other tools proves
nothing, so a mismatch stops the run instead of skipping. Both happen once, after
collection and outside any test's time limit (a first build takes minutes).

Tiers: every test that uses the ``llama_bin`` fixture, every test of the modules in
:data:`SLOW_MODULES` and the tests in :data:`SLOW_TESTS` are marked ``llama`` here,
centrally; ``python -m pytest -m "not llama"`` is the fast tier.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tinymodels import (  # noqa: E402
    CHATML_JINJA,
    CHATML_TOKENS,
    DENSE,
    MOE,
    sample_text,
    write_tiny_model,
)

from imatrix.errors import ImatrixError  # noqa: E402
from imatrix.reference import pinned_tools_dir  # noqa: E402

#: modules whose tests run whole workflows, clusters, the demo model or many killed
#: processes: in the slow (``llama``) tier whatever fixtures they use
SLOW_MODULES = frozenset(
    {
        "test_workflow",
        "test_workflow_kill",
        "test_workflow_plan",
        "test_slurm",
        "test_demo",
        "test_crash_resume",
        "test_workflow_datasets",
    }
)
#: single tests (module, function) of several seconds each that repeat whole collections
#: to prove equal results, run Snakemake or draw every plot: in the slow tier too, so the
#: fast one stays under a minute
SLOW_TESTS = frozenset(
    {
        ("test_collect_lib", "test_resume_equals_uninterrupted_run"),
        ("test_collect_lib", "test_early_stop_gives_identical_data"),
        ("test_collect_lib", "test_gpu_layers_path_gives_identical_data"),
        ("test_collect_lib", "test_a_wrong_probe_is_caught_and_undone"),
        ("test_collect_lib", "test_threads_and_shared_inputs_do_not_change_the_sums"),
        ("test_bad_input", "test_config_schema_violation_fails_before_any_job"),
        ("test_plots", "test_write_plots_standard_set"),
        ("test_convergence", "test_until_converged_equals_a_run_of_that_many_chunks"),
        ("test_convergence", "test_resume_across_a_record_boundary_is_byte_identical"),
    }
)
_TOOLS = pytest.StashKey[Path]()


def _is_slow(item: pytest.Item) -> bool:
    if "llama_bin" in getattr(item, "fixturenames", ()):
        return True
    module = getattr(item, "module", None)
    name = module.__name__ if module is not None else ""
    function = getattr(item, "originalname", item.name)
    return name in SLOW_MODULES or (name, function) in SLOW_TESTS


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.llama)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Locate (or build) and check llama.cpp's tools when a selected test needs them."""
    if session.config.option.collectonly:
        return
    if any("llama_bin" in getattr(i, "fixturenames", ()) for i in session.items):
        _locate(session.config)


def _locate(config: pytest.Config) -> Path:
    if _TOOLS not in config.stash:
        try:
            config.stash[_TOOLS] = pinned_tools_dir()
        except ImatrixError as exc:
            raise pytest.UsageError(f"llama.cpp's reference tools: {exc}") from None
    return config.stash[_TOOLS]


@pytest.fixture(scope="session")
def llama_bin(pytestconfig: pytest.Config) -> Path:
    """Directory holding llama-imatrix, llama-quantize and llama-perplexity of the
    pinned llama.cpp."""
    return _locate(pytestconfig)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def dense_model(models_dir: Path) -> Path:
    return write_tiny_model(models_dir / "tiny-dense.gguf", DENSE, seed=1)


@pytest.fixture(scope="session")
def moe_model(models_dir: Path) -> Path:
    return write_tiny_model(models_dir / "tiny-moe.gguf", MOE, seed=2)


@pytest.fixture(scope="session")
def chat_model(models_dir: Path) -> Path:
    """The dense model with chatml's turn markers as control tokens and its Jinja
    template in ``tokenizer.chat_template``."""
    return write_tiny_model(
        models_dir / "tiny-chat.gguf",
        DENSE,
        seed=6,
        chat_template=CHATML_JINJA,
        control_tokens=CHATML_TOKENS,
    )


@pytest.fixture(params=["dense", "moe"])
def tiny_model(request: pytest.FixtureRequest, dense_model: Path, moe_model: Path) -> Path:
    """Each test using this runs once on the dense and once on the MoE model."""
    return dense_model if request.param == "dense" else moe_model


@pytest.fixture(scope="session")
def calib_text(models_dir: Path) -> Path:
    """About 3000 tokens of text: enough for several 128-token chunks."""
    p = models_dir / "calib.txt"
    p.write_text(sample_text(2500, seed=3), encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def calib_text2(models_dir: Path) -> Path:
    p = models_dir / "calib2.txt"
    p.write_text(sample_text(1500, seed=4), encoding="utf-8")
    return p
