"""The sink contract, one test class subclassed once per output writer.

In the style of zarr's ``testing/store.py::StoreTests``: :class:`SinkTests` holds the tests
every :class:`~streamvec.engine.sinks.Sink` must pass, and a subclass per implementation (or
per way the engine configures it) supplies a ``case`` fixture: a lazy model to write, how to
make the sink, and how the real consumer of that format loads the result (zarr,
``safetensors.safe_open``, transformers ``from_pretrained``). The contract:

- blocks written in any order (forward, backward, shuffled), or by the engine from several
  threads at once, give byte-identical files;
- the output loads back with the real consumer equal to the blocks that were written (after
  the writer: a lossy writer says, in the block, what it stored);
- ``streamvec verify`` passes on it;
- a sink continued after a stop (``reopen``) and finished gives the same bytes as one
  uninterrupted write;
- through the engine: a failure mid-way (a disk that fills) leaves nothing under the final
  name and no partial output beside it; an interruption keeps the job record and done log,
  and ``resume=True`` then produces the bytes of an uninterrupted run.

To add an implementation, subclass :class:`SinkTests` in ``tests/test_sink_contract.py`` with
a ``case`` fixture returning a :class:`SinkCase`.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamvec.engine.execute import _checksums, block_digest, run
from streamvec.engine.sinks import PlannedTensor, Sink
from streamvec.errors import OutputError
from streamvec.io.blocks import matrix_shape
from streamvec.model.algebra import Model
from streamvec.model.tensor import row_ranges
from streamvec.tools.verify import verify
from streamvec.version import __version__

from .faults import snapshot


@dataclass
class SinkCase:
    """A sink under test.

    Attributes:
        model: the lazy model whose tensors are written.
        make: a fresh sink of the implementation under test.
        load: the real consumer: the output's tensors by name, as the values written.
        block_rows: rows per block of each tensor (a short last block where it can be).
        run_options: what makes the engine pick this sink (``format``, ``compression``,
            ``shard_size``...), for the tests that run the whole engine.
    """

    model: Model
    make: Callable[[], Sink]
    load: Callable[[Path], dict[str, np.ndarray]]
    block_rows: Callable[[Any], int]
    run_options: dict[str, Any] = field(default_factory=dict)

    def plan(self) -> list[PlannedTensor]:
        tensors = self.model.resolved().tensors.values()
        return [PlannedTensor(t, self.block_rows(t)) for t in tensors]

    def attrs(self) -> dict[str, Any]:
        """Root attrs as the engine records them (``streamvec verify`` reads them)."""
        resolved = self.model.resolved()
        return {
            "format": 1,
            "kind": resolved.kind,
            "operation": "combine",
            "expression": self.model.describe(),
            "sources": [s.info for s in self.model.sources()],
            "created_by": f"streamvec {__version__}",
            "skipped_nonfloat": list(resolved.skipped_nonfloat),
            "kept_base": list(resolved.kept_base),
        }


Block = tuple[PlannedTensor, int, int]


def blocks_of(plan: list[PlannedTensor]) -> list[Block]:
    return [
        (p, r0, r1)
        for p in plan
        for r0, r1 in row_ranges(matrix_shape(p.tensor.shape)[0], p.block_rows)
    ]


def write_blocks(sink: Sink, blocks: list[Block]) -> dict[tuple[str, int], np.ndarray]:
    """Compute and write ``blocks`` in the order given; the blocks as stored, by (name, r0)."""
    written = {}
    writers: dict[str, Any] = {}  # one per tensor, as the engine asks (some cost a pass)
    for p, r0, r1 in blocks:
        block = p.tensor.read_rows(r0, r1)
        if p.tensor.name not in writers:
            writers[p.tensor.name] = sink.writer(p.tensor.name)
        writers[p.tensor.name].write(r0, block)  # a lossy writer rewrites ``block``
        written[(p.tensor.name, r0)] = block
    return written


def finish(sink: Sink, case: SinkCase, plan: list[PlannedTensor], written: dict) -> None:
    digests = {key: block_digest(block) for key, block in written.items()}
    sink.finish(_checksums(plan, digests), case.attrs())
    sink.close()


def write_output(case: SinkCase, directory: Path, order: str = "forward") -> dict[str, np.ndarray]:
    """Write the whole model through a fresh sink; the tensors as written, by name."""
    plan = case.plan()
    blocks = blocks_of(plan)
    if order == "backward":
        blocks = blocks[::-1]
    elif order == "shuffled":
        rng = np.random.default_rng(7)
        blocks = [blocks[i] for i in rng.permutation(len(blocks))]
    directory.mkdir(parents=True)
    sink = case.make()
    sink.prepare(directory, plan, case.attrs())
    written = write_blocks(sink, blocks)
    finish(sink, case, plan, written)
    return assemble(plan, written)


def assemble(plan: list[PlannedTensor], written: dict) -> dict[str, np.ndarray]:
    out = {}
    for p in plan:
        rows, _ = matrix_shape(p.tensor.shape)
        parts = [written[(p.tensor.name, r0)] for r0, _ in row_ranges(rows, p.block_rows)]
        out[p.tensor.name] = np.concatenate(parts).reshape(p.tensor.shape)
    return out


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` by relative path, with its bytes."""
    return {
        str(f.relative_to(directory)): f.read_bytes()
        for f in sorted(directory.rglob("*"))
        if f.is_file()
    }


def assert_same_tree(a: Path, b: Path) -> None:
    ta, tb = tree(a), tree(b)
    assert sorted(ta) == sorted(tb)
    differ = [name for name in ta if ta[name] != tb[name]]
    assert not differ, f"files differ: {differ}"


class FailingWriters:
    """Wraps a sink class's writers so that the ``at``-th block written raises ``error``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type, at: int, error: BaseException):
        self.count = 0
        self.lock = threading.Lock()
        original = cls.writer
        outer = self

        class Failing:
            def __init__(self, inner: Any) -> None:
                self.inner = inner

            def write(self, r0: int, block: np.ndarray) -> float:
                with outer.lock:
                    outer.count += 1
                    fail = outer.count == at
                if fail:
                    raise error
                return self.inner.write(r0, block)

        monkeypatch.setattr(cls, "writer", lambda sink, name: Failing(original(sink, name)))


# One block at a time, in plan order; finished blocks logged at the end of the run only (each
# log flush is an os.sync of the whole machine), except in the run a test interrupts.
ENGINE = {"scheduler": "sync", "workers": 1, "progress": False, "sync_seconds": 3600.0}


class SinkTests:
    """The contract every sink passes; subclasses provide the ``case`` fixture."""

    @pytest.fixture
    def case(self, tmp_path: Path) -> SinkCase:
        raise NotImplementedError("a subclass builds its case here")

    def test_plan_has_several_blocks_and_a_short_last_one(self, case: SinkCase) -> None:
        plan = case.plan()
        blocks = blocks_of(plan)
        assert len(blocks) > len(plan), "every tensor in one block tests no order"
        assert any(matrix_shape(p.tensor.shape)[0] % p.block_rows for p in plan)

    @pytest.mark.parametrize("order", ["backward", "shuffled"])
    def test_blocks_in_any_order_give_the_same_files(
        self, case: SinkCase, tmp_path: Path, order: str
    ) -> None:
        write_output(case, tmp_path / "forward")
        write_output(case, tmp_path / order, order)
        assert_same_tree(tmp_path / "forward", tmp_path / order)

    def test_loads_back_with_the_real_consumer(self, case: SinkCase, tmp_path: Path) -> None:
        written = write_output(case, tmp_path / "out", "shuffled")
        loaded = case.load(tmp_path / "out")
        assert set(written) <= set(loaded)
        for name, want in written.items():
            got = loaded[name]
            assert got.shape == want.shape, name
            assert got.dtype == want.dtype, name
            assert got.tobytes() == want.tobytes(), name

    def test_verify_passes(self, case: SinkCase, tmp_path: Path) -> None:
        write_output(case, tmp_path / "out", "backward")
        assert verify(tmp_path / "out").checked >= len(case.plan())

    def test_reopened_after_a_stop_gives_the_same_bytes(
        self, case: SinkCase, tmp_path: Path
    ) -> None:
        write_output(case, tmp_path / "whole")
        plan = case.plan()
        blocks = blocks_of(plan)
        half = len(blocks) // 2
        out = tmp_path / "stopped"
        out.mkdir()
        first = case.make()
        first.prepare(out, plan, case.attrs())
        written = write_blocks(first, blocks[:half])
        first.close()  # stopped here; a new process continues
        second = case.make()
        second.reopen(out, plan, case.attrs())
        written |= write_blocks(second, blocks[half:])
        finish(second, case, plan, written)
        assert_same_tree(tmp_path / "whole", out)

    def test_blocks_written_by_several_threads_give_the_same_files(
        self, case: SinkCase, tmp_path: Path
    ) -> None:
        run(case.model, tmp_path / "sync", **ENGINE, **case.run_options)
        threads = ENGINE | {"scheduler": "threads", "workers": 4}
        run(case.model, tmp_path / "threads", **threads, **case.run_options)
        assert_same_tree(tmp_path / "sync", tmp_path / "threads")

    def test_a_failure_mid_way_leaves_nothing(
        self, case: SinkCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        out = tmp_path / "out"
        inputs = [Path(s.label) for s in case.model.sources()]
        before = snapshot(*inputs)
        full = OSError(errno.ENOSPC, "No space left on device")
        FailingWriters(monkeypatch, type(case.make()), 3, full)
        with pytest.raises(OutputError) as info:
            run(case.model, out, **ENGINE, **case.run_options)
        assert "\n" not in str(info.value) and "space" in str(info.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no partial, no lock
        assert snapshot(*inputs) == before

    def test_resume_after_an_interruption_gives_identical_bytes(
        self, case: SinkCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        whole, out = tmp_path / "whole", tmp_path / "resumed"
        run(case.model, whole, **ENGINE, **case.run_options)
        with monkeypatch.context() as m:
            FailingWriters(m, type(case.make()), 3, KeyboardInterrupt())
            with pytest.raises(KeyboardInterrupt):
                run(case.model, out, **(ENGINE | {"sync_seconds": 0.0}), **case.run_options)
        assert not out.exists()  # the job stays in its partial sibling, for --resume
        report = run(case.model, out, resume=True, **ENGINE, **case.run_options)
        assert report.resumed_blocks >= 2
        assert_same_tree(whole, out)
        assert verify(out).checked == len(case.plan())
