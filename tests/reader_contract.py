"""The block-reader contract, one test class subclassed once per reader implementation.

In the style of zarr's ``testing/store.py::StoreTests``: :class:`ReaderTests` holds the tests
every :class:`~streamvec.io.blocks.BlockReader` must pass, and a subclass per implementation
supplies a ``case`` fixture that builds the reader from real files (written by safetensors,
zarr, torch, peft or streamvec itself) next to an independent float64 reference of the whole
tensor. The contract:

- rows ``[r0, r1)`` equal the same rows of the reference (bit for bit where the reader only
  moves bytes; within the case's tolerance where it computes, e.g. ``U S Vh`` or ``B @ A``);
- any row split gives the same bytes as one read, and reads from several threads at once
  give the same bytes as one thread;
- a reader survives pickling (it is shipped to worker processes) and is hashable;
- every read has the declared dtype and ``(r1 - r0, cols)`` shape; empty ranges (and tensors
  with zero rows) read as empty arrays; the last, partial block is read like the others; a
  range outside the tensor is an error, never data;
- a file truncated, rewritten or replaced after the reader was made is the documented error
  (:class:`~streamvec.errors.InputChangedError` for safetensors files,
  :class:`~streamvec.errors.StoreError` for Zarr chunks) naming the file, never wrong data.

A case is built in a fresh copy of its files (``tmp_path``), so the damage tests can change
them. To add an implementation, subclass :class:`ReaderTests` in
``tests/test_reader_contract.py`` with a ``case`` fixture returning a :class:`ReaderCase`.
"""

from __future__ import annotations

import itertools
import os
import pickle
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from streamvec.errors import InputChangedError, StreamvecError
from streamvec.io.blocks import BlockReader, matrix_shape, read_block
from streamvec.io.read_buffers import ReadBuffers

F32_EPS = float(np.finfo(np.float32).eps)


@dataclass
class ReaderCase:
    """A reader under test and what it must return.

    Attributes:
        reader: the reader, built through the code path users reach (``open_source``...).
        reference: the whole tensor as a float64 ``(rows, cols)`` array, computed
            independently of streamvec (safetensors, zarr, numpy on the stored factors).
        shape: the tensor shape the files declare.
        dtype: the dtype the reader must return.
        tolerance: 0 for bit-exact readers; else the largest error allowed, in float32
            epsilons at the tensor's scale (``max |reference|``).
        target: the file the damage tests change (its rows are read by a whole read).
        error: the error a damaged ``target`` must raise.
        names: what that error's message must contain (the file, or the store).
    """

    reader: BlockReader
    reference: np.ndarray
    shape: tuple[int, ...]
    dtype: np.dtype
    target: Path
    tolerance: float = 0.0
    error: type[StreamvecError] = InputChangedError
    names: str = ""

    def __post_init__(self) -> None:
        self.names = self.names or str(self.target)


def copy_tree(src: Path, dst: Path) -> Path:
    """A private copy of ``src`` (a file or a folder) at ``dst``."""
    if src.is_dir():
        return Path(shutil.copytree(src, dst))
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(src, dst))


def _later(path: Path, st: os.stat_result) -> None:
    # The kernel stamps mtimes with a coarse clock (a few ms): a rewrite in the same tick as
    # the original write keeps its mtime. A real rewrite comes seconds later; say so here.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def truncate(path: Path) -> None:
    """Cut the file's last bytes (a copy interrupted, a disk full while writing)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.truncate(max(0, st.st_size - 5))


def rewrite(path: Path) -> None:
    """Rewrite the file in place with other bytes of the same size."""
    st = path.stat()
    raw = bytearray(path.read_bytes())
    for i in range(max(0, len(raw) - 64), len(raw)):
        raw[i] ^= 0x5A  # the last bytes: tensor data in a safetensors file, payload in a chunk
    with open(path, "r+b") as f:
        f.write(raw)
    _later(path, st)


def replace(path: Path) -> None:
    """Rename another file of the same size over it (a new inode)."""
    raw = bytearray(path.read_bytes())
    for i in range(max(0, len(raw) - 64), len(raw)):
        raw[i] ^= 0xA5
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(raw)
    os.replace(fresh, path)


DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated": truncate,
    "rewritten": rewrite,
    "replaced": replace,
}


def splits(rows: int) -> list[list[tuple[int, int]]]:
    """Row partitions of ``[0, rows)``: one row at a time, fixed heights, irregular cuts."""
    out = [[(r, r + 1) for r in range(rows)]]
    for step in (2, 3, 7, max(1, rows - 1)):
        out.append([(r, min(rows, r + step)) for r in range(0, rows, step)])
    rng = np.random.default_rng(rows)
    cuts = sorted({0, rows, *rng.integers(0, rows + 1, size=min(rows, 5)).tolist()})
    out.append(list(itertools.pairwise(cuts)))
    return [s for s in out if s]


class ReaderTests:
    """The contract every block reader passes; subclasses provide the ``case`` fixture."""

    @pytest.fixture
    def case(self, tmp_path: Path) -> ReaderCase:
        raise NotImplementedError("a subclass builds its reader here")

    @staticmethod
    def whole(case: ReaderCase) -> np.ndarray:
        rows, _ = matrix_shape(case.reader.shape)
        return case.reader.read(0, rows)

    def test_declared_shape_and_dtype(self, case: ReaderCase) -> None:
        r = case.reader
        assert tuple(r.shape) == case.shape
        assert np.dtype(r.dtype) == case.dtype
        rows, cols = matrix_shape(case.shape)
        assert case.reference.shape == (rows, cols)
        for r0, r1 in [(0, rows), (0, min(rows, 1)), (max(0, rows - 1), rows)]:
            got = r.read(r0, r1)
            assert got.shape == (r1 - r0, cols)
            assert got.dtype == case.dtype

    def test_rows_equal_the_independent_reference(self, case: ReaderCase) -> None:
        got = self.whole(case).astype(np.float64)
        want = case.reference
        if case.tolerance == 0:
            # Bit for bit: compare as floats (NaN-free inputs) and as bytes of the dtype.
            np.testing.assert_array_equal(got, want)
            assert self.whole(case).tobytes() == want.astype(case.dtype).tobytes()
        else:
            scale = max(float(np.abs(want).max(initial=0.0)), np.finfo(np.float32).tiny)
            worst = float(np.abs(got - want).max(initial=0.0)) / (F32_EPS * scale)
            assert worst <= case.tolerance, f"{worst:.2f} eps off (allowed {case.tolerance})"

    def test_any_row_split_gives_the_same_bytes(self, case: ReaderCase) -> None:
        rows, _ = matrix_shape(case.shape)
        whole = self.whole(case)
        for split in splits(rows):
            parts = [case.reader.read(r0, r1) for r0, r1 in split]
            joined = np.concatenate(parts) if parts else whole[:0]
            assert joined.tobytes() == whole.tobytes(), split

    def test_empty_ranges_and_the_last_partial_block(self, case: ReaderCase) -> None:
        rows, cols = matrix_shape(case.shape)
        for r in sorted({0, rows // 2, rows}):
            empty = case.reader.read(r, r)
            assert empty.shape == (0, cols) and empty.dtype == case.dtype
        whole = self.whole(case)
        for step in (2, 3, 7):
            # Blocks of ``step`` rows: the last one is short when ``step`` does not divide rows.
            start = (rows // step) * step if rows % step else max(0, rows - step)
            last = case.reader.read(start, rows)
            assert last.shape[0] == rows - start
            assert last.tobytes() == whole[start:].tobytes()

    def test_reads_into_a_run_s_reused_buffers_give_the_same_bytes(self, case: ReaderCase) -> None:
        # The engine reads blocks into maps it reuses from block to block (read_block with a
        # lease); whatever the last block left in them must not show through.
        rows, _ = matrix_shape(case.shape)
        whole = self.whole(case)
        pool = ReadBuffers()
        for split in splits(rows):
            for r0, r1 in split:
                with pool.lease() as lease:
                    area = lease.take(1 << 16)
                    area[:] = b"\xab" * len(area)  # a dirty map for the next read
                with pool.lease() as lease:
                    got = read_block(case.reader, r0, r1, lease).tobytes()
                assert got == whole[r0:r1].tobytes(), (r0, r1)

    def test_a_range_outside_the_tensor_is_refused(self, case: ReaderCase) -> None:
        rows, _ = matrix_shape(case.shape)
        for r0, r1 in [(0, rows + 1), (rows + 1, rows + 2), (1, 0) if rows else (0, 1)]:
            # IndexError, or a ValueError (StreamvecError is one): never rows of data.
            with pytest.raises((IndexError, ValueError)):
                case.reader.read(r0, r1)

    def test_reads_from_several_threads_give_the_same_bytes(self, case: ReaderCase) -> None:
        rows, _ = matrix_shape(case.shape)
        whole = self.whole(case)
        ranges = [rng for split in splits(rows) for rng in split] * 2
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda rr: case.reader.read(*rr).tobytes(), ranges))
        for (r0, r1), data in zip(ranges, got, strict=True):
            assert data == whole[r0:r1].tobytes(), (r0, r1)

    def test_picklable_and_hashable(self, case: ReaderCase) -> None:
        # Readers travel to worker processes and dask.distributed workers: paths and
        # offsets, never an open handle or a map.
        copy = pickle.loads(pickle.dumps(case.reader))
        rows, _ = matrix_shape(case.shape)
        assert copy.read(0, rows).tobytes() == self.whole(case).tobytes()
        hash(case.reader)

    @pytest.mark.parametrize("damage", sorted(DAMAGE))
    def test_a_damaged_file_is_an_error_naming_it(self, case: ReaderCase, damage: str) -> None:
        rows, _ = matrix_shape(case.shape)
        if rows == 0 or case.reference.size == 0:
            pytest.skip("a tensor without bytes reads nothing from its file")
        DAMAGE[damage](case.target)
        with pytest.raises(case.error) as info:
            self.whole(case)
        assert case.names in str(info.value)
        assert "\n" not in str(info.value)
