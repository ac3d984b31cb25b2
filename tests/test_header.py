"""Header validation: valid files from the real library parse; broken ones raise HeaderError."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamvec.errors import HeaderError, StreamvecError
from streamvec.io.safetensors.header import MAX_HEADER_BYTES, parse_header, read_header


def raw_file(path: Path, header: object, data: bytes = b"", *, length: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def test_reads_what_safetensors_writes(tmp_path: Path) -> None:
    import ml_dtypes

    tensors = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b/c": np.ones(5, dtype=ml_dtypes.bfloat16),
        "s": np.array(3.0, dtype=np.float16),
        "i": np.arange(4, dtype=np.int64),
        "m": np.array([True, False]),
    }
    p = tmp_path / "x.safetensors"
    safetensors.numpy.save_file(tensors, str(p), metadata={"format": "pt"})
    hdr = read_header(p)
    assert hdr.metadata == {"format": "pt"}
    assert set(hdr.tensors) == set(tensors)
    raw = p.read_bytes()
    for name, arr in tensors.items():
        info = hdr.tensors[name]
        assert info.shape == arr.shape
        assert info.dtype == arr.dtype
        got = np.frombuffer(raw[info.offset : info.offset + info.nbytes], dtype=info.dtype)
        np.testing.assert_array_equal(got.reshape(arr.shape), arr)


VALID = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (b"not json", b"", "not valid UTF-8 JSON"),
        (b"\xff\xfe", b"", "not valid UTF-8 JSON"),
        ([1, 2], b"", "not a JSON object"),
        ({"t": {"dtype": "Q8", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "negative"),
        (
            {"t": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
            b"\0" * 4,
            "non-integer",
        ),
        ({"t": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8, "non-integer"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 16, "needs 8"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "trailing"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlaps",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            b"\0" * 12,
            "gap",
        ),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "span"),
        ({"t": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "missing field"),
        (
            {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}},
            b"\0" * 8,
            "unknown field",
        ),
        ({"t": [1]}, b"", "not a JSON object"),
        ({"__metadata__": {"a": 1}, **VALID}, b"\0" * 8, "__metadata__"),
        (
            {"t": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}},
            b"\0" * 8,
            "needs",
        ),
        ({"t": {"dtype": "F32", "shape": [1] * 17, "data_offsets": [0, 4]}}, b"\0" * 4, "at most"),
        ({"": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "empty name"),
    ],
)
def test_broken_headers(tmp_path: Path, header: object, data: bytes, message: str) -> None:
    p = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(HeaderError, match=message) as exc:
        read_header(p)
    assert str(p) in str(exc.value)  # the message names the file


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    body = (
        b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
        b' "t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    )
    with pytest.raises(HeaderError, match="duplicate key 't'"):
        read_header(raw_file(tmp_path / "dup.safetensors", body, b"\0" * 8))


@pytest.mark.parametrize("size", [0, 3, 7])
def test_too_short(tmp_path: Path, size: int) -> None:
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\1" * size)
    with pytest.raises(HeaderError, match="too short"):
        read_header(p)


def test_header_length_beyond_file(tmp_path: Path) -> None:
    p = raw_file(tmp_path / "long.safetensors", VALID, b"\0" * 8, length=10_000)
    with pytest.raises(HeaderError, match="beyond the file"):
        read_header(p)


def test_absurd_header_length_is_refused_without_allocating(tmp_path: Path) -> None:
    p = tmp_path / "huge.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        f.truncate(MAX_HEADER_BYTES + 100)  # sparse: costs no disk
    with pytest.raises(HeaderError, match="exceeds"):
        read_header(p)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(HeaderError, match="directory"):
        read_header(tmp_path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=1000))
def test_arbitrary_bytes_raise_only_our_error(raw: bytes, data_size: int) -> None:
    try:
        parse_header(raw, data_size, Path("fuzz.safetensors"))
    except StreamvecError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_headers_raise_only_our_error(data: st.DataObject) -> None:
    doc = {
        "a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
        "b": {"dtype": "I64", "shape": [1], "data_offsets": [12, 20]},
    }
    raw = bytearray(json.dumps(doc).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        hdr = parse_header(bytes(raw), 20, Path("m.safetensors"))
    except StreamvecError:
        return
    # Whatever was accepted is self-consistent: contiguous and covering the data area.
    spans = sorted((t.offset - hdr.data_start, t.nbytes) for t in hdr.tensors.values())
    pos = 0
    for begin, n in spans:
        assert begin == pos
        pos += n
    assert pos == 20
