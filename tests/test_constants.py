"""The constants every module shares, against the library and tools that define them.

ggml's type table is checked for EVERY type id against the libggml that
llama-cpp-python loads (the one our quantize and collect calls run), so that a
missing or wrong size can no longer silently switch off a size check.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest

from imatrix import constants as C
from imatrix.errors import ImatrixError
from imatrix.gguf_io import read_gguf


@pytest.fixture(scope="module")
def libggml() -> ctypes.CDLL:
    from imatrix.ggml import libggml_base

    lib = libggml_base()
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = ctypes.c_size_t
    return lib


def test_type_count_matches_the_bindings():
    import llama_cpp

    assert llama_cpp.GGML_TYPE_COUNT == C.GGML_TYPE_COUNT
    assert max(C.GGML_TYPE_SIZES) == C.GGML_TYPE_COUNT - 1


@pytest.mark.parametrize("tid", range(C.GGML_TYPE_COUNT))
def test_every_ggml_type_matches_libggml(libggml, tid):
    """Sizes and names of every id; ids ggml has removed (block size 0) are unknown."""
    blck = int(libggml.ggml_blck_size(tid))
    if blck == 0:
        assert tid not in C.GGML_TYPE_SIZES
        return
    assert C.GGML_TYPE_SIZES[tid] == (blck, int(libggml.ggml_type_size(tid)))
    assert C.ggml_type_name(tid) == libggml.ggml_type_name(tid).decode()


def test_supplement_only_holds_what_gguf_py_lacks_or_has_wrong():
    """Drop an entry of the supplement once gguf-py has it right (this test says when)."""
    known = {int(t) for t in gguf.GGMLQuantizationType}
    assert C.GGML_TYPE_Q2_0 not in known
    assert {int(t) for t in gguf.GGML_QUANT_SIZES} == known
    q8_1 = gguf.GGMLQuantizationType.Q8_1
    assert gguf.GGML_QUANT_SIZES[q8_1] != C.GGML_TYPE_SIZES[int(q8_1)]


def test_keys_are_llama_cpp_spellings():
    assert C.GGUF_MAGIC == b"GGUF"
    assert (C.KEY_DATASETS, C.KEY_CHUNK_COUNT, C.KEY_CHUNK_SIZE) == (
        "imatrix.datasets",
        "imatrix.chunk_count",
        "imatrix.chunk_size",
    )
    assert C.KEY_GENERAL_TYPE == "general.type" and C.GENERAL_TYPE_IMATRIX == "imatrix"
    assert C.KEYS_QUANTIZE_IMATRIX == (
        "quantize.imatrix.file",
        "quantize.imatrix.dataset",
        "quantize.imatrix.entries_count",
        "quantize.imatrix.chunks_count",
    )


def test_split_names(tmp_path):
    assert C.split_name("m", 2, 3) == "m-00002-of-00003.gguf"
    assert C.parse_split_name("a-b-00002-of-00003.gguf") == ("a-b", 2, 3)
    assert C.parse_split_name("m-2-of-3.gguf") is None
    assert C.parse_split_name("m-00001-of-00002.gguf.part") is None
    p = tmp_path / "m-00002-of-00003.gguf"
    assert C.split_paths(p) == [tmp_path / f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert C.split_paths(tmp_path / "m.gguf") == [tmp_path / "m.gguf"]
    assert C.split_paths(tmp_path / "m-00001-of-00001.gguf") == [tmp_path / "m-00001-of-00001.gguf"]


def test_ggml_nbytes():
    assert C.ggml_nbytes(int(gguf.GGMLQuantizationType.Q4_K), (512, 3)) == 2 * 3 * 144
    assert C.ggml_nbytes(int(gguf.GGMLQuantizationType.Q4_K), (100, 3)) is None  # not blocks
    assert C.ggml_nbytes(4, (32,)) is None  # removed type


def _one_tensor_model(path: Path, qtype: gguf.GGMLQuantizationType) -> Path:
    """A GGUF with one 4 x 256 tensor of ``qtype`` (zero bytes) and a trailing tensor."""
    blck, size = gguf.GGML_QUANT_SIZES[qtype]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("a", np.zeros((4, 256 // blck * size), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_IQ_TYPES = [t for t in gguf.GGMLQuantizationType if t.name.startswith("IQ")]


@pytest.mark.parametrize("qtype", _IQ_TYPES, ids=lambda t: t.name)
def test_truncated_iq_tensor_is_refused(tmp_path, qtype):
    """IQ types were missing from the reader's size table, so a model file cut inside an
    IQ tensor passed the strict reader; now it is refused, naming the tensor."""
    p = _one_tensor_model(tmp_path / "m.gguf", qtype)
    g = read_gguf(p, load_data=False)
    assert g.tensors[0].type == int(qtype)
    data = p.read_bytes()
    blck, size = gguf.GGML_QUANT_SIZES[qtype]
    nbytes = 4 * (256 // blck) * size
    end = len(data) - (-nbytes) % 32  # the data ends before the trailing padding
    p.write_bytes(data[: end - 1])
    with pytest.raises(ImatrixError, match=r"truncated GGUF: data of tensor 'a' ends at byte"):
        read_gguf(p, load_data=False)
