"""The synthetic checkpoint pairs the benchmark measures on, and the files and bytes of a step.

The synthetic checkpoints are :mod:`streamvec.tools.synth` pairs: bf16 Llama-shaped weights and a
fine-tune whose delta is low-rank plus noise. They are not real fine-tunes, and their deltas
compress differently from real ones (2.0x with lz4+bitshuffle here; the design brief cites
2.6x for real bf16 deltas, not measured in this project).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path


def size_label(params: str) -> str:
    """A directory-safe label for a size such as ``0.3B``."""
    return re.sub(r"[^0-9A-Za-z.]+", "_", params.strip())


def ensure_pair(
    workdir: Path, params: str, *, log: Callable[[str], None] | None = None
) -> tuple[Path, Path]:
    """A synthetic bf16 base and fine-tune of ``params`` parameters under ``workdir``.

    Reused when a previous run finished them (a ``.done`` marker next to them, written last,
    so a pair cut short by a crash is rebuilt rather than trusted).
    """
    from streamvec.tools import synth

    label = size_label(params)
    base, ft = workdir / f"base-{label}", workdir / f"ft-{label}"
    done = workdir / f".pair-{label}.done"
    if done.is_file() and base.is_dir() and ft.is_dir():
        return base, ft
    for d in (base, ft):
        shutil.rmtree(d, ignore_errors=True)
    started = time.perf_counter()
    synth.build_checkpoint(base, params=params, dtype="bfloat16", shard_size="1GB", seed=0)
    synth.build_finetune(base, ft, rank=8, seed=1)
    done.write_text(json.dumps({"params": params}) + "\n")
    if log is not None:
        log(f"  built {base.name} + {ft.name} in {time.perf_counter() - started:.0f} s")
    return base, ft


# Written into every work directory the benchmark uses: what is in one is the benchmark's to
# delete (checkpoints, outputs), and nothing else ever is.
WORKDIR_MARKER = ".streamvec-bench"


def claim_workdir(workdir: Path) -> None:
    """Make ``workdir`` the benchmark's, or refuse one that holds anything else.

    The benchmark deletes the checkpoints and outputs it writes there; a directory of the
    user's own files (a ``--workdir`` pointed at a models folder, with a ``base-1B`` in it)
    must not lose any of them.

    Raises:
        OutputError: ``workdir`` holds files and no benchmark has used it.
    """
    from streamvec.errors import OutputError

    workdir.mkdir(parents=True, exist_ok=True)
    marker = workdir / WORKDIR_MARKER
    # a work directory of a benchmark before the marker existed has its pairs' markers
    ours = marker.is_file() or any(workdir.glob(".pair-*.done"))
    if not ours and any(workdir.iterdir()):
        raise OutputError(
            f"--workdir {workdir}: holds files that streamvec bench did not write there; it "
            "deletes what it writes in its work directory, so give it an empty or new one"
        )
    marker.touch()


def weight_files(*checkpoints: Path) -> list[Path]:
    """The tensor files of checkpoints (what a step reads)."""
    files: list[Path] = []
    for c in checkpoints:
        files.extend(sorted(c.glob("*.safetensors")) if c.is_dir() else [c])
    return files


def store_files(store: Path) -> list[Path]:
    """Every file of a Zarr store: a step reading the store reads these bytes."""
    return sorted(p for p in store.rglob("*") if p.is_file())


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (or of the file)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove_pair(workdir: Path, size: str) -> None:
    """Delete the synthetic checkpoints of ``size`` (multi-GB) from ``workdir``."""
    label = size_label(size)
    shutil.rmtree(workdir / f"base-{label}", ignore_errors=True)
    shutil.rmtree(workdir / f"ft-{label}", ignore_errors=True)
    (workdir / f".pair-{label}.done").unlink(missing_ok=True)
    (workdir / f"ties-{label}.yaml").unlink(missing_ok=True)
