"""Bad input through the real command line: refused in one line, and nothing damaged.

Every case runs ``python -m imatrix ...`` in a subprocess (what a user or a job script
runs) in a directory that already holds the user's earlier outputs, and requires:
exit code 1; exactly one line on stderr saying ``imatrix <cmd>: error: ...``, last,
naming the file, tensor or key at fault; no traceback and no other error-level line;
and every file in that directory and every input named on the command line unchanged
(sha256 before and after), with no file added. For calibration: the same kind of
battery run against llama.cpp's own tools was handled cleanly in only 8 to 12 of 15
cases (lost messages, a model GGUF accepted as an imatrix with its output overwritten,
a shape mismatch leaving a changed output, a missing output directory reported as
success). Config schema violations go through the ``snakemake`` command.

Also here, the two places where llama-imatrix only warns or accepts and the drop-in
must do the same: text that is not UTF-8 (tokenized as bytes) and a context larger
than the model's training context (a warning), both checked against llama-imatrix.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from ci import skip_or_fail
from llamatools import llama_imatrix
from tinymodels import DENSE, TinySpec, write_tiny_model

from imatrix import faults
from imatrix.collect import CollectSettings, collect
from imatrix.formats import read_imatrix, write_imatrix
from imatrix.tokenize import tokenize_file

pytestmark = pytest.mark.timeout(600)

PREVIOUS = b"the user's earlier result: no failed run may touch it"


@dataclass
class Kit:
    """The inputs, good and bad, shared by all cases (read-only for them)."""

    d: Path
    dense: Path
    moe: Path
    other: Path
    nan: Path
    calib: Path
    short: Path
    empty: Path
    latin: Path
    im: Path
    im_dat: Path
    other_im: Path
    renamed_im: Path
    trunc_model: Path
    not_gguf: Path
    trunc_dat: Path
    lying_dat: Path
    moe_tokens: Path

    def __getitem__(self, name: str) -> Path:
        return getattr(self, name)


@pytest.fixture(scope="module")
def kit(tmp_path_factory, dense_model, moe_model, calib_text) -> Kit:
    d = tmp_path_factory.mktemp("kit")
    other = write_tiny_model(d / "other.gguf", TinySpec(n_embd=512, n_ff=1024), seed=5)
    nan = write_tiny_model(d / "nan.gguf", DENSE, seed=1, nan_weights=True)
    calib = d / "calib.txt"
    shutil.copyfile(calib_text, calib)
    text = calib.read_text(encoding="utf-8")
    (d / "short.txt").write_text(text[:300], encoding="utf-8")  # ~210 tokens
    (d / "empty.txt").write_bytes(b"")
    (d / "latin.txt").write_bytes(
        "café, naïve; ".encode("latin-1") + b"\xff\xfe\x80 " + calib.read_bytes()
    )

    def imatrix_of(model: Path, name: str) -> Path:
        toks = d / f"{name}.npy"
        tokenize_file(model, calib, toks)
        out = d / f"{name}.gguf"
        collect(
            model,
            toks,
            out,
            CollectSettings(n_ctx=128, last_chunk=4, compute_ppl=False, progress=False),
        )
        return out

    im = imatrix_of(dense_model, "im")
    other_im = imatrix_of(other, "other_im")
    tokenize_file(moe_model, calib, d / "moe.npy")
    data = read_imatrix(im)
    write_imatrix(data, d / "im.dat", output_format="dat")
    data.entries = {k.replace("blk.", "layer."): v for k, v in data.entries.items()}
    write_imatrix(data, d / "renamed_im.gguf")
    (d / "trunc_model.gguf").write_bytes(dense_model.read_bytes()[:100_000])
    (d / "not_gguf.gguf").write_text("this is a text file, not a model\n")
    (d / "trunc.dat").write_bytes((d / "im.dat").read_bytes()[:1000])
    (d / "lying.dat").write_bytes(struct.pack("<i", 1000) + b"\x05\x00\x00\x00abcde")
    (d / "adir").mkdir()
    os.symlink("loop_b", d / "loop_a")
    os.symlink("loop_a", d / "loop_b")
    return Kit(
        d=d,
        dense=dense_model,
        moe=moe_model,
        other=other,
        nan=nan,
        calib=calib,
        short=d / "short.txt",
        empty=d / "empty.txt",
        latin=d / "latin.txt",
        im=im,
        im_dat=d / "im.dat",
        other_im=other_im,
        renamed_im=d / "renamed_im.gguf",
        trunc_model=d / "trunc_model.gguf",
        not_gguf=d / "not_gguf.gguf",
        trunc_dat=d / "trunc.dat",
        lying_dat=d / "lying.dat",
        moe_tokens=d / "moe.npy",
    )


def _collect(k: Kit, o: Path, model: Path, text: Path, *extra: object) -> list[object]:
    return ["collect", "-m", model, "-f", text, "-o", o, "-c", 128, "-t", 1, *extra]


#: id -> (command line builder (kit, output dir) -> argv, words the error line must contain)
CASES: dict[str, tuple[Callable[[Kit, Path], list[object]], tuple[str, ...]]] = {
    "model-missing": (
        lambda k, o: _collect(k, o / "out.gguf", k.d / "missing.gguf", k.calib),
        ("missing.gguf", "no such file"),
    ),
    "model-is-a-directory": (
        lambda k, o: _collect(k, o / "out.gguf", k.d / "adir", k.calib),
        ("adir", "directory"),
    ),
    "model-unreadable": (
        lambda k, o: _collect(k, o / "out.gguf", k.d / "loop_a", k.calib),
        ("loop_a", "cannot read"),
    ),
    "model-not-gguf": (
        lambda k, o: _collect(k, o / "out.gguf", k.not_gguf, k.calib),
        ("not_gguf.gguf", "not a GGUF file"),
    ),
    "model-truncated": (
        lambda k, o: _collect(k, o / "out.gguf", k.trunc_model, k.calib),
        ("trunc_model.gguf", "truncated GGUF", "token_embd.weight"),
    ),
    "model-truncated-tokenize": (
        lambda k, o: ["tokenize", "-m", k.trunc_model, "-f", k.calib, "-o", o / "out.npy"],
        ("trunc_model.gguf", "truncated GGUF"),
    ),
    "imatrix-as-model-collect": (
        lambda k, o: _collect(k, o / "out.gguf", k.im, k.calib),
        ("im.gguf", "is an imatrix GGUF, not a model"),
    ),
    "imatrix-as-model-quantize": (
        lambda k, o: ["quantize", k.im, o / "out.gguf", "Q4_K_M"],
        ("im.gguf", "is an imatrix GGUF, not a model"),
    ),
    "quant-not-gguf-evaluate": (
        lambda k, o: [
            "evaluate",
            k.dense,
            k.not_gguf,
            "-f",
            k.calib,
            "-c",
            128,
            "--chunks",
            2,
            "-o",
            o / "out.parquet",
        ],
        ("not_gguf.gguf", "not a GGUF file"),
    ),
    "model-as-imatrix-quantize": (
        lambda k, o: ["quantize", k.dense, o / "out.gguf", "Q4_K_M", "--imatrix", k.moe],
        ("tiny-moe.gguf", "is a model GGUF", "not an imatrix"),
    ),
    "model-as-imatrix-collect-in-file": (
        lambda k, o: _collect(k, o / "out.gguf", k.dense, k.calib, "--in-file", k.moe),
        ("tiny-moe.gguf", "is a model GGUF"),
    ),
    "model-as-imatrix-stats": (
        lambda k, o: ["stats", k.dense, "--parquet", o],
        ("tiny-dense.gguf", "is a model GGUF"),
    ),
    "dat-truncated": (
        lambda k, o: ["convert", k.trunc_dat, "-o", o / "out.gguf"],
        ("trunc.dat", "truncated", "blk.0.attn_k.weight"),
    ),
    "dat-lying-header": (
        lambda k, o: ["combine", k.im, k.lying_dat, "-o", o / "out.gguf"],
        ("lying.dat", "1000 entries"),
    ),
    "other-model-imatrix-quantize": (
        lambda k, o: ["quantize", k.dense, o / "out.gguf", "Q4_K_M", "--imatrix", k.other_im],
        (
            "other_im.gguf: does not fit",
            "tiny-dense.gguf",
            "imatrix size 512 is different from tensor size 256 for blk.",
        ),
    ),
    "other-model-imatrix-combine": (
        lambda k, o: ["combine", k.im, k.other_im, "-o", o / "out.gguf"],
        ("different models", "--force"),
    ),
    "other-model-imatrix-collect-in-file": (
        lambda k, o: _collect(
            k, o / "out.gguf", k.dense, k.calib, "--in-file", k.other_im, "--chunks", 2
        ),
        ("inconsistent size for 'blk.", "512 values, the model gives 256"),
    ),
    "shape-mismatch-combine": (
        lambda k, o: ["combine", "--force", k.im, k.other_im, "-o", o / "out.gguf"],
        ("other_im.gguf", "tensor 'blk.0.attn_k.weight' has 512 values"),
    ),
    "text-shorter-than-two-chunks": (
        lambda k, o: _collect(k, o / "out.gguf", k.dense, k.short),
        ("short.txt", "you need at least 256 tokens"),
    ),
    "empty-text": (
        lambda k, o: _collect(k, o / "out.gguf", k.dense, k.empty),
        ("empty.txt", "only 1 tokens"),
    ),
    "chunk-beyond-the-end": (
        lambda k, o: _collect(k, o / "out.gguf", k.dense, k.calib, "--chunk", 100),
        ("calib.txt", "not enough tokens left after removing 100 chunks"),
    ),
    "unknown-quant-type": (
        lambda k, o: ["quantize", k.dense, o / "out.gguf", "Q9_X", "--imatrix", k.im],
        ("unknown quantization type 'Q9_X'",),
    ),
    "imatrix-names-match-nothing": (
        lambda k, o: ["quantize", k.dense, o / "out.gguf", "Q4_K_M", "--imatrix", k.renamed_im],
        ("renamed_im.gguf", "none of its 14 tensors is in", "layer.0.attn_k.weight"),
    ),
    "tokens-of-another-model": (
        lambda k, o: [
            "collect",
            "-m",
            k.dense,
            "--tokens",
            k.moe_tokens,
            "-o",
            o / "out.gguf",
            "-c",
            128,
        ],
        ("moe.npy", "was tokenized with another model"),
    ),
    "nan-activations": (
        lambda k, o: _collect(k, o / "out.gguf", k.nan, k.calib, "--chunks", 2),
        ("non-finite activations", "'blk.1.ffn_down.weight'"),
    ),
    "output-in-missing-directory-collect": (
        lambda k, o: _collect(k, o / "nowhere" / "out.gguf", k.dense, k.calib),
        ("nowhere/out.gguf", "does not exist"),
    ),
    "output-in-missing-directory-evaluate": (
        lambda k, o: [
            "evaluate",
            k.dense,
            k.dense,
            "-f",
            k.calib,
            "-c",
            128,
            "-o",
            o / "nowhere" / "s.parquet",
        ],
        ("nowhere/s.parquet", "does not exist"),
    ),
}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def snapshot(d: Path, argv: list[object]) -> dict[str, str]:
    """sha256 of every file under ``d`` and of every existing file named in ``argv``."""
    files = {p for p in d.rglob("*") if p.is_file() and not p.is_symlink()}
    files |= {Path(str(a)) for a in argv if isinstance(a, Path) and a.is_file()}
    return {str(p): _sha(p) for p in sorted(files)}


def user_outputs(d: Path) -> None:
    """Earlier results under every name a case might write."""
    for name in ("out.gguf", "out.gguf.checkpoint", "out.npy", "out.json", "out.parquet"):
        (d / name).write_bytes(PREVIOUS + name.encode())
    for name in ("tensors.parquet", "layers.parquet"):
        (d / name).write_bytes(PREVIOUS + name.encode())


def run_cli(argv: list[object], **kw) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    return subprocess.run(
        [sys.executable, "-m", "imatrix", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        **kw,
    )


def assert_refused(proc: subprocess.CompletedProcess[str], command: str, *needles: str) -> None:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [x for x in lines if ": error: " in x]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    assert errors[0].startswith(f"imatrix {command}: error: "), errors[0]
    assert not [x for x in lines if x.startswith("E ")], proc.stderr  # nothing else at error level
    for n in needles:
        assert n in errors[0], errors[0]


def check_case(argv: list[object], needles: tuple[str, ...], d: Path, **kw) -> None:
    before = snapshot(d, argv)
    proc = run_cli(argv, **kw)
    assert_refused(proc, str(argv[0]), *needles)
    assert snapshot(d, argv) == before  # nothing changed, nothing added, nothing removed


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line_and_nothing_touched(case, kit, tmp_path):
    build, needles = CASES[case]
    user_outputs(tmp_path)
    check_case(build(kit, tmp_path), needles, tmp_path)


# --- outputs that cannot be written -------------------------------------------------


def test_output_in_read_only_directory(kit, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    user_outputs(ro)
    ro.chmod(0o555)
    root = os.geteuid() == 0
    # root ignores modes: make the directory immutable instead
    chattr = ["chattr", "+i", str(ro)]
    if root and subprocess.run(chattr, capture_output=True, timeout=60).returncode != 0:
        skip_or_fail("cannot make a directory read-only for root here (chattr +i)")
    try:
        argv = _collect(kit, ro / "out.gguf", kit.dense, kit.calib)
        check_case(argv, ("ro/out.gguf", "permission denied"), tmp_path)
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(ro)], check=True, timeout=60)
        ro.chmod(0o755)


def _file_size_limit(limit: int) -> Callable[[], None]:
    def pre() -> None:  # in the child: writes past `limit` bytes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return pre


def test_file_size_limit_during_quantize(kit, tmp_path):
    """llama.cpp's own writer fails (Q8_0 of the tiny model is ~0.9 MB)."""
    user_outputs(tmp_path)
    argv = ["quantize", kit.dense, tmp_path / "out.gguf", "Q8_0"]
    needles = ("out.gguf", "writing the quantized model failed")
    check_case(argv, needles, tmp_path, preexec_fn=_file_size_limit(200_000))


def test_file_size_limit_during_convert(kit, tmp_path):
    user_outputs(tmp_path)
    argv = ["convert", kit.im, "-o", tmp_path / "out.gguf"]
    needles = ("out.gguf", "file too large")
    check_case(argv, needles, tmp_path, preexec_fn=_file_size_limit(20_000))


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs (needs root and mount permission, as in CI containers)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
        capture_output=True,
        timeout=60,
    )
    if proc.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)


def test_disk_full_during_the_final_write(kit, tiny_fs):
    """The output (~36 KB) does not fit beside the earlier one: ENOSPC at the end of a
    collection; the earlier output survives whole."""
    (tiny_fs / "out.gguf").write_bytes(kit.im.read_bytes())  # the user's earlier result
    (tiny_fs / "filler").write_bytes(b"\0" * 16_000)
    argv = _collect(kit, tiny_fs / "out.gguf", kit.dense, kit.calib, "--chunks", 2, "--no-ppl")
    check_case(argv, ("out.gguf", "no space left on device"), tiny_fs)


# --- config schema violations, through snakemake --------------------------------------

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = (sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow" / "Snakefile"))

CONFIG_VIOLATIONS = {
    "wrong type": (
        lambda c: c["collect"].update(n_ctx="big"),
        "collect.n_ctx: 'big' is not of type 'integer'",
    ),
    "zero weight": (
        lambda c: c["datasets"]["beta"].update(weight=0),
        "datasets.beta.weight: 0 is less than or equal to the minimum of 0",
    ),
    "negative min_expert_tokens": (
        lambda c: c.update(health={"min_expert_tokens": -1}),
        "health.min_expert_tokens: -1 is less than the minimum of 0",
    ),
    "min_expert_tokens not an integer": (
        lambda c: c.update(health={"min_expert_tokens": 1.5}),
        "health.min_expert_tokens: 1.5 is not of type 'integer'",
    ),
    "unknown output format": (
        lambda c: c.update(output_formats=["gguf", "safetensors"]),
        "output_formats.1: 'safetensors' is not one of",
    ),
}


def _without_snakemake_log(snap: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in snap.items() if "/.snakemake/log/" not in k}


@pytest.mark.parametrize("case", list(CONFIG_VIOLATIONS))
def test_config_schema_violation_fails_before_any_job(case, tmp_path, dense_model):
    from test_workflow import load_config, make_workdir

    change, needle = CONFIG_VIOLATIONS[case]
    cfg = load_config()
    change(cfg)
    wd = make_workdir(tmp_path / "w", dense_model, cfg)
    before = _without_snakemake_log(snapshot(wd, []))
    proc = subprocess.run(
        [*SNAKEMAKE, "-c1", "--configfile", "config.yaml"],
        cwd=wd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out, out
    # one line names the key and the reason; jsonschema's report (schema, instance) stays out
    said = [x for x in out.splitlines() if x.startswith("invalid config: ")]
    assert len(said) == 1 and needle in said[0], out
    assert "Failed validating" not in out and "On instance" not in out, out
    assert not (wd / "results").exists() and not (wd / "logs").exists()
    assert _without_snakemake_log(snapshot(wd, [])) == before
    assert yaml.safe_load((wd / "config.yaml").read_text()) == cfg


# --- where llama-imatrix warns or accepts, so does the drop-in -------------------------


def _same_result(ours: Path, ref: Path) -> None:
    from test_collect import assert_same_imatrix

    assert_same_imatrix(ours, ref)


def test_text_that_is_not_utf8_is_tokenized_as_bytes(kit, tmp_path, llama_bin):
    flags = ["-f", kit.latin, "-c", 128, "--chunks", 3, "--no-ppl", "-t", 1]
    ref = tmp_path / "ref.gguf"
    llama_imatrix(llama_bin, "-m", kit.dense, "-o", ref, *flags)
    ours = tmp_path / "ours.gguf"
    proc = run_cli(["collect", "-m", kit.dense, "-o", ours, *flags])
    assert proc.returncode == 0, proc.stderr
    complaints = [
        x for x in proc.stderr.splitlines() if x.startswith("E ") or "UTF" in x or "decod" in x
    ]
    assert not complaints, proc.stderr
    _same_result(ours, ref)
    # and `imatrix tokenize` gives the tokens the collection used
    toks = tmp_path / "t.npy"
    assert run_cli(["tokenize", "-m", kit.dense, "-f", kit.latin, "-o", toks]).returncode == 0
    via_tokens = tmp_path / "via_tokens.gguf"
    proc = run_cli(["collect", "-m", kit.dense, "--tokens", toks, "-o", via_tokens, *flags[2:]])
    assert proc.returncode == 0, proc.stderr
    assert read_imatrix(via_tokens).entries.keys() == read_imatrix(ours).entries.keys()


def test_context_above_training_context_only_warns(kit, tmp_path, llama_bin):
    """The tiny model was trained on 2048 tokens; -c 4096 is allowed, with a warning."""
    flags = ["-f", kit.calib, "-c", 4096, "-b", 4096, "--chunks", 1, "--no-ppl", "-t", 1]
    ref = tmp_path / "ref.gguf"
    proc_ref = llama_imatrix(llama_bin, "-m", kit.dense, "-o", ref, *flags)
    assert proc_ref.returncode == 0
    ours = tmp_path / "ours.gguf"
    proc = run_cli(["collect", "-m", kit.dense, "-o", ours, *flags])
    assert proc.returncode == 0, proc.stderr
    warnings = [x for x in proc.stderr.splitlines() if x.startswith("W imatrix.collect")]
    assert warnings == [
        "W imatrix.collect: model was trained on only 2048 context tokens (4096 specified)"
    ], proc.stderr
    _same_result(ours, ref)
