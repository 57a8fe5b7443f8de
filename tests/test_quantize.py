"""Quantization parity: our files are byte-identical to llama-quantize's.

Every comparison runs the real llama-quantize (built from the pinned source) with the
same options on the tiny models (row sizes are multiples of 256, so every k- and
i-quant applies without fallbacks) and an imatrix written by the real llama-imatrix.
"""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

import numpy as np
import pytest

from imatrix.errors import ImatrixError
from imatrix.formats import read_imatrix
from imatrix.gguf_io import read_gguf
from imatrix.quantize import QUANT_TYPES, quantize, requires_imatrix


def run_llama_quantize(llama_bin: Path, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(llama_bin / "llama-quantize"), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


def llama_quantize_ok(llama_bin: Path, *args: str | Path) -> None:
    r = run_llama_quantize(llama_bin, *args)
    assert r.returncode == 0, r.stdout[-3000:]


@pytest.fixture(scope="session")
def real_imatrices(
    llama_bin: Path, models_dir: Path, dense_model: Path, moe_model: Path, calib_text: Path
) -> dict[str, dict[str, Path]]:
    """For each tiny model, a GGUF imatrix made by llama-imatrix and its legacy .dat."""
    out: dict[str, dict[str, Path]] = {}
    for kind, model in (("dense", dense_model), ("moe", moe_model)):
        gg = models_dir / f"real-im-{kind}.gguf"
        dat = models_dir / f"real-im-{kind}.dat"
        for cmd in (
            ["-m", model, "-f", calib_text, "-o", gg, "-c", "64", "--chunks", "4", "--no-ppl"],
            ["-m", model, "--in-file", gg, "-o", dat, "--output-format", "dat"],
        ):
            r = subprocess.run(
                [str(llama_bin / "llama-imatrix"), *map(str, cmd)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=300,
            )
            assert r.returncode == 0, r.stdout[-3000:]
        out[kind] = {"gguf": gg, "dat": dat}
    return out


def kv(path: Path) -> dict:
    g = read_gguf(path)
    return {k: v.value for k, v in g.kv.items()}


CASES = [
    # (model, imatrix format, type): i-quants that need the imatrix, k-quant mixes, and
    # Q4_0 (whose ffn_down mix changes when an imatrix is present)
    ("dense", "gguf", "IQ2_XXS"),
    ("dense", "gguf", "IQ3_XXS"),
    ("dense", "gguf", "Q4_K_M"),
    ("dense", "gguf", "Q2_K_S"),
    ("dense", "gguf", "Q4_0"),
    ("moe", "gguf", "IQ2_XXS"),
    ("moe", "gguf", "Q4_K_M"),
    ("moe", "gguf", "IQ4_XS"),
    ("moe", "gguf", "Q3_K_S"),
    ("dense", "dat", "IQ2_XXS"),
    ("dense", "dat", "Q4_K_M"),
    ("moe", "dat", "IQ3_XXS"),
    ("moe", "dat", "Q5_K_S"),
]


@pytest.mark.parametrize(("kind", "fmt", "qtype"), CASES, ids=["-".join(c) for c in CASES])
def test_byte_identical_with_imatrix(
    kind, fmt, qtype, llama_bin, dense_model, moe_model, real_imatrices, calib_text, tmp_path
):
    model = dense_model if kind == "dense" else moe_model
    im = real_imatrices[kind][fmt]
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    llama_quantize_ok(llama_bin, "--imatrix", im, model, ref, qtype)
    assert quantize(model, ours, qtype, imatrix=str(im)) == ours
    assert filecmp.cmp(ref, ours, shallow=False)
    # the imatrix really was applied and recorded: the metadata llama-quantize adds
    meta = kv(ours)
    assert meta["quantize.imatrix.file"] == str(im)
    assert meta["quantize.imatrix.entries_count"] > 0
    # chunks_count only when the file's chunk count is above 0 (llama-imatrix --in-file
    # writes 0 into a converted .dat)
    chunks = read_imatrix(im).chunk_count
    assert chunks == (4 if fmt == "gguf" else 0)
    assert meta.get("quantize.imatrix.chunks_count", 0) == chunks
    assert meta["quantize.imatrix.dataset"] == str(calib_text)
    assert sorted(tmp_path.iterdir()) == [ours, ref]  # no temporary file left behind


def test_imatrix_changes_the_weights(dense_model, real_imatrices, tmp_path):
    """Guards the parity tests above against passing vacuously (imatrix silently ignored)."""
    with_im, without = tmp_path / "a.gguf", tmp_path / "b.gguf"
    quantize(dense_model, with_im, "Q4_K_M", imatrix=str(real_imatrices["dense"]["gguf"]))
    quantize(dense_model, without, "Q4_K_M")
    import gguf

    a, b = gguf.GGUFReader(str(with_im)), gguf.GGUFReader(str(without))
    name = "blk.0.ffn_up.weight"
    ta = next(t for t in a.tensors if t.name == name)
    tb = next(t for t in b.tensors if t.name == name)
    assert ta.tensor_type == tb.tensor_type == gguf.GGMLQuantizationType.Q4_K
    assert not np.array_equal(ta.data, tb.data)
    assert "quantize.imatrix.file" not in kv(without)


OVERRIDES = [
    [
        "--tensor-type",
        "attn_v=q8_0",
        "--tensor-type",
        "FFN_DOWN=iq3_s",
        "--tensor-type",
        "blk\\.1\\.ffn_up=q6_k",
    ],
    [
        "--output-tensor-type",
        "q5_K",
        "--token-embedding-type",
        "q4_k",
        "--tensor-type",
        "attn_q=iq2_xs",
    ],
    [
        "--leave-output-tensor",
        "--pure",
        "--override-kv",
        "general.name=str:renamed",
        "--override-kv",
        "tiny.answer=int:42",
        "--override-kv",
        "tiny.flag=bool:true",
        "--override-kv",
        "tiny.ratio=float:0.25",
    ],
    ["--include-weights", "ffn_", "--include-weights", "attn_q"],
    ["--exclude-weights", "blk.1."],
]


def _to_kwargs(flags: list[str]) -> dict:
    kw: dict = {"tensor_types": [], "override_kv": [], "include_weights": [], "exclude_weights": []}
    it = iter(flags)
    for f in it:
        key = f.lstrip("-").replace("-", "_")
        if key in ("leave_output_tensor", "pure", "allow_requantize", "keep_split"):
            kw[key] = True
        elif key == "tensor_type":
            kw["tensor_types"].append(next(it))
        elif key in ("override_kv", "include_weights", "exclude_weights"):
            kw[key].append(next(it))
        else:
            kw[key] = next(it)
    return kw


@pytest.mark.parametrize("flags", OVERRIDES, ids=range(len(OVERRIDES)))
def test_options_byte_identical(flags, llama_bin, tiny_model, real_imatrices, tmp_path):
    kind = "moe" if "moe" in tiny_model.name else "dense"
    im = real_imatrices[kind]["gguf"]
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    llama_quantize_ok(llama_bin, *flags, "--imatrix", im, tiny_model, ref, "IQ3_M")
    quantize(tiny_model, ours, "IQ3_M", imatrix=str(im), **_to_kwargs(flags))
    assert filecmp.cmp(ref, ours, shallow=False)


def test_tensor_type_overrides_take_effect(dense_model, real_imatrices, tmp_path):
    out = tmp_path / "o.gguf"
    quantize(
        dense_model,
        out,
        "Q4_K_M",
        imatrix=str(real_imatrices["dense"]["gguf"]),
        tensor_types=["attn_v=q8_0", ("ffn_down", "IQ3_S")],
    )
    types = {t.name: t.type for t in read_gguf(out).tensors}
    assert types["blk.0.attn_v.weight"] == 8  # q8_0
    assert types["blk.1.ffn_down.weight"] == 21  # iq3_s
    assert types["blk.0.ffn_up.weight"] == 12  # q4_K (the mix, untouched)


def test_every_type_without_imatrix(llama_bin, dense_model, tmp_path):
    """All of llama-quantize's types: same bytes, and the same refusals, which are
    exactly the types requires_imatrix() names."""
    refused = []
    for qtype in QUANT_TYPES:
        ref, ours = tmp_path / f"ref-{qtype}.gguf", tmp_path / f"ours-{qtype}.gguf"
        r = run_llama_quantize(llama_bin, dense_model, ref, qtype)
        if r.returncode != 0:
            assert "requires an imatrix" in r.stdout
            refused.append(qtype)
            with pytest.raises(ImatrixError, match="requires an imatrix"):
                quantize(dense_model, ours, qtype)
            assert not ours.exists()
        else:
            quantize(dense_model, ours, qtype)
            assert filecmp.cmp(ref, ours, shallow=False), qtype
        assert requires_imatrix(qtype) == (qtype in refused), qtype
    assert {"IQ2_XXS", "IQ3_XXS"} <= set(refused)
    assert not list(tmp_path.glob(".*"))


def test_type_table_matches_llama_quantize(llama_bin):
    """QUANT_TYPES is llama-quantize's own list (its usage text), names and ftypes."""
    r = run_llama_quantize(llama_bin, "--help")
    listed: dict[str, int] = {}
    section = r.stdout.split("allowed quantization types", 1)[1]
    for line in section.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] == "or" and parts[0].isdigit():
            listed[parts[2]] = int(parts[0])
        elif parts and parts[0] == "COPY":
            listed["COPY"] = 0
    assert listed == QUANT_TYPES
    assert list(listed) == list(QUANT_TYPES)


def test_ggml_type_names_match_library():
    import ctypes
    from pathlib import Path as P

    import llama_cpp

    from imatrix.qtypes import GGML_TYPE_COUNT, GGML_TYPES

    libdir = P(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(next(libdir.glob("libggml-base.so*"))))
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    assert llama_cpp.GGML_TYPE_COUNT == GGML_TYPE_COUNT
    for name, tid in GGML_TYPES.items():
        assert lib.ggml_type_name(tid).decode() == name
    for name, ftype in QUANT_TYPES.items():
        if name in ("Q3_K", "Q4_K", "Q5_K", "COPY"):
            continue
        const = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
        assert getattr(llama_cpp, const) == ftype, name


def test_requantize_to_f16(llama_bin, dense_model, tmp_path):
    """The demo's F16 base is made from a quantized model with allow_requantize."""
    q = tmp_path / "q.gguf"
    quantize(dense_model, q, "Q4_K_M")
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    llama_quantize_ok(llama_bin, "--allow-requantize", q, ref, "F16")
    quantize(q, ours, "F16", allow_requantize=True)
    assert filecmp.cmp(ref, ours, shallow=False)
    with pytest.raises(ImatrixError, match=r"requantizing from type q\d_K is disabled"):
        quantize(q, tmp_path / "no.gguf", "F16")


def _write_split_model(path_prefix: Path, seed: int) -> Path:
    """The tiny dense model written in 3 shards by gguf-py (as convert_hf_to_gguf --split)."""
    import sys

    import gguf

    sys.path.insert(0, str(Path(__file__).parent))
    from tinymodels import DENSE, write_tiny_model

    whole = write_tiny_model(path_prefix.with_suffix(".whole.gguf"), DENSE, seed=seed)
    g = gguf.GGUFReader(str(whole))
    w = gguf.GGUFWriter(str(path_prefix) + ".gguf", "llama", split_max_tensors=8)
    for field in g.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(field.name, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(field.name, field.contents(), vtype)
    for t in g.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    shards = sorted(path_prefix.parent.glob(path_prefix.name + "-*-of-*.gguf"))
    assert len(shards) == 3
    return shards[0]


def test_split_models(llama_bin, tmp_path, real_imatrices):
    first = _write_split_model(tmp_path / "split", seed=1)  # same weights as dense_model
    im = str(real_imatrices["dense"]["gguf"])
    # a split input quantized to one file
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    llama_quantize_ok(llama_bin, "--imatrix", im, first, ref, "Q4_K_M")
    quantize(first, ours, "Q4_K_M", imatrix=im)
    assert filecmp.cmp(ref, ours, shallow=False)
    # --keep-split: one output shard per input shard, same names
    (tmp_path / "r").mkdir()
    (tmp_path / "o").mkdir()
    llama_quantize_ok(
        llama_bin, "--keep-split", "--imatrix", im, first, tmp_path / "r" / "q.gguf", "IQ2_XXS"
    )
    got = quantize(first, tmp_path / "o" / "q.gguf", "IQ2_XXS", imatrix=im, keep_split=True)
    assert got == tmp_path / "o" / "q-00001-of-00003.gguf"
    refs = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert refs == sorted(p.name for p in (tmp_path / "o").iterdir())
    assert len(refs) == 3
    for name in refs:
        assert filecmp.cmp(tmp_path / "r" / name, tmp_path / "o" / name, shallow=False)


def test_failure_leaves_existing_output_untouched(dense_model, tmp_path):
    out = tmp_path / "model-IQ2_XXS.gguf"
    out.write_bytes(b"previous file")
    with pytest.raises(ImatrixError, match="requires an imatrix"):
        quantize(dense_model, out, "IQ2_XXS")
    assert out.read_bytes() == b"previous file"
    assert sorted(tmp_path.iterdir()) == [out]


def test_imatrix_of_another_shape_is_refused(dense_model, tmp_path):
    """llama.cpp's own check (an imatrix row size unlike the tensor's) becomes our error."""
    from imatrix.formats import write_imatrix
    from imatrix.model import Entry, ImatrixData

    im = tmp_path / "wrong.gguf"
    write_imatrix(
        ImatrixData(
            entries={"blk.0.attn_q.weight": Entry(np.ones(128), np.array([10.0]))},
            datasets=["x"],
            chunk_count=1,
        ),
        im,
        compat=True,
    )
    with pytest.raises(ImatrixError, match="imatrix size 128 is different from tensor size 256"):
        quantize(dense_model, tmp_path / "x.gguf", "Q4_K_M", imatrix=str(im))
    assert sorted(tmp_path.iterdir()) == [im]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"qtype": "Q4_K_XL"}, "unknown quantization type 'Q4_K_XL'"),
        ({"tensor_types": ["attn_v"]}, "malformed --tensor-type 'attn_v'"),
        ({"tensor_types": ["attn_v=q9_K"]}, "invalid tensor type in --tensor-type 'q9_K'"),
        ({"tensor_types": ["attn_v=q8_K"]}, "invalid tensor type in --tensor-type 'q8_K'"),
        ({"output_tensor_type": "i32"}, "invalid --output-tensor-type 'i32'"),
        ({"override_kv": ["general.name=foo"]}, "invalid type in --override-kv"),
        ({"override_kv": ["x.y=int:abc"]}, "invalid int value"),
        ({"override_kv": ["x.y=str:" + "a" * 128]}, "cannot exceed 127 bytes"),
        (
            {"include_weights": ["a"], "exclude_weights": ["b"], "imatrix": "IM"},
            "cannot be used together",
        ),
        (
            {"token_embedding_type": "iq2_xxs"},
            "tensor 'token_embd.weight' cannot be quantized to iq2_xxs",
        ),
        ({"imatrix": "missing.gguf"}, "missing.gguf: no such file"),
    ],
)
def test_user_errors(kwargs, message, dense_model, real_imatrices, tmp_path):
    kw = dict(kwargs)
    qtype = kw.pop("qtype", "Q4_K_M")
    if kw.get("imatrix") == "IM":
        kw["imatrix"] = str(real_imatrices["dense"]["gguf"])
    elif kw.get("imatrix"):
        kw["imatrix"] = str(tmp_path / kw["imatrix"])
    with pytest.raises(ImatrixError, match=message.replace("(", r"\(").replace("*", r"\*")):
        quantize(dense_model, tmp_path / "out.gguf", qtype, **kw)
    assert not (tmp_path / "out.gguf").exists()


def test_same_file_and_missing_input(dense_model, tmp_path):
    with pytest.raises(ImatrixError, match="same"):
        quantize(dense_model, dense_model, "Q4_K_M")
    with pytest.raises(ImatrixError, match="no such model file"):
        quantize(tmp_path / "nope.gguf", tmp_path / "o.gguf", "Q4_K_M")
    with pytest.raises(ImatrixError, match="does not exist"):
        quantize(dense_model, tmp_path / "nodir" / "o.gguf", "Q4_K_M")


def test_requires_imatrix_names():
    assert requires_imatrix("IQ2_XXS") and requires_imatrix("iq3_xxs") and requires_imatrix("23")
    assert not requires_imatrix("Q4_K_M") and not requires_imatrix("F16")
    with pytest.raises(ImatrixError, match="unknown quantization type"):
        requires_imatrix("Q7")


def test_cli(llama_bin, dense_model, real_imatrices, tmp_path, capsys):
    from imatrix.cli import main

    im = str(real_imatrices["dense"]["gguf"])
    tt = tmp_path / "types.txt"
    tt.write_text("attn_v=q8_0\nffn_down=q5_K  attn_q=iq4_xs\n")
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    args = ["--imatrix", im, "--tensor-type-file", str(tt), "--override-kv", "a.b=str:c"]
    assert main(["quantize", *args, str(dense_model), str(ours), "iq3_xxs", "2"]) == 0
    llama_quantize_ok(llama_bin, *args, dense_model, ref, "IQ3_XXS", "2")
    assert filecmp.cmp(ref, ours, shallow=False)
    assert capsys.readouterr().out == ""  # nothing on stdout: the output is the file
    # user errors: one line on stderr, exit 1
    assert main(["quantize", str(dense_model), str(tmp_path / "x.gguf"), "IQ2_XXS"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("I ")]
    assert len(err) == 1, err  # llama.cpp's error banner is folded into our one line
    assert err[0].startswith("imatrix quantize: error: ") and "requires an imatrix" in err[0]
    assert main(["quantize", str(dense_model), str(tmp_path / "x.gguf"), "Q9"]) == 1
    assert "unknown quantization type 'Q9'" in capsys.readouterr().err
    # usage errors: exit 2
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(dense_model)])
    assert exc.value.code == 2
    assert not (tmp_path / "x.gguf").exists()
