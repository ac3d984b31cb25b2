"""The peers a step is compared with on the user's own machine, when they are installed.

For the ``svd`` step the peer is the loop a user would write without streamvec: for each 2-D
array of the same task-vector store, ``torch.svd_lowrank(A, q=K + 10, niter=2)`` (torch's
default ``niter``), factors kept in memory, nothing written. It runs in a child process (its
imports and memory apart from the benchmark's), right after each run of the step, so both
sides of the ratio see the same machine load; the child times the loop itself, after its
imports, and reports the mean relative residual so that the accuracy is compared too. The
child's whole wall time, start-up included (less the residuals' float64 pass, which only
the benchmark needs), is kept as well: the step's seconds are a whole ``streamvec svd``
process, so the two ratios bracket the comparison.

For the ``combine-ckpt`` step (the edited model ``base + 0.5 (ft - base)`` from the
checkpoints) the peer is mergekit's ``task_arithmetic`` on the same pair (``mergekit-yaml
CONFIG OUT --no-copy-tokenizer``, weight 0.5, ``dtype: bfloat16``), when ``mergekit`` imports
here or ``mergekit-yaml`` is on ``PATH`` (it often lives in a venv of its own); the child's
whole wall time is compared, start-up included, like the step's. mergekit has no randomized
SVD (its LoRA extraction runs a full SVD per matrix), so the ``svd`` step has no mergekit peer.

    python -m streamvec.tools.benchmark.peers torch-svd-lowrank STORE RANK
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PeerRun", "missing_peers", "peer_notes", "peers_for", "run_peer"]

TORCH = "torch.svd_lowrank"
MERGEKIT = "mergekit task_arithmetic"
# step -> (peer name, the module it needs)
PEERS: dict[str, tuple[tuple[str, str], ...]] = {
    "svd": ((TORCH, "torch"),),
    "combine-ckpt": ((MERGEKIT, "mergekit"),),
}
INSTALL_HINTS = {
    "torch": "pip install torch",
    "mergekit": "pip install mergekit (or put its mergekit-yaml on PATH)",
}
TORCH_NITER = 2  # torch.svd_lowrank's default
OVERSAMPLE = 10  # streamvec svd's default --oversample


@dataclass(frozen=True)
class PeerRun:
    """One run of a peer: the loop's own seconds, its process's peak, its mean residual, and
    its process's whole wall time (start-up included; ``seconds`` again where the peer is
    timed as a whole process)."""

    seconds: float
    peak_anon_bytes: int
    mean_residual: float | None
    matrices: int
    process_seconds: float


def peers_for(step: str) -> list[str]:
    """The peers of ``step`` installed here (none when their modules are missing).

    Args:
        step: a step name of ``streamvec bench``.

    Returns:
        Peer names, e.g. ``["torch.svd_lowrank"]``.
    """
    return [name for name, module in PEERS.get(step, ()) if _installed(module)]


def missing_peers(step: str) -> list[str]:
    """One line per peer of ``step`` that is not installed here: what to install.

    Args:
        step: a step name of ``streamvec bench``.

    Returns:
        Lines such as ``"combine-ckpt: no mergekit task_arithmetic comparison (pip install
        mergekit ...)"``; empty when every peer is installed.
    """
    return [
        f"{step}: no {name} comparison ({INSTALL_HINTS[module]})"
        for name, module in PEERS.get(step, ())
        if not _installed(module)
    ]


def _installed(module: str) -> bool:
    if importlib.util.find_spec(module) is not None:
        return True
    return module == "mergekit" and shutil.which("mergekit-yaml") is not None


def run_peer(name: str, store: Path, rank: int, pair: tuple[Path, Path] | None = None) -> PeerRun:
    """Run one peer in a child process.

    Args:
        name: a peer from :func:`peers_for`.
        store: the task-vector store the step factors (``svd``'s peer).
        rank: the step's rank.
        pair: (base, fine-tune) checkpoints of the step (``combine-ckpt``'s peer).

    Returns:
        The :class:`PeerRun`.

    Raises:
        RuntimeError: the child failed (its last line says why).
    """
    from streamvec.memory import PeakSampler

    if name == MERGEKIT:
        if pair is None:
            raise ValueError("the mergekit peer needs the (base, fine-tune) pair")
        return _run_mergekit(*pair, store.parent)
    if name != TORCH:
        raise ValueError(f"unknown peer {name!r}")
    cmd = [sys.executable, "-m", "streamvec.tools.benchmark.peers", "torch-svd-lowrank", str(store)]
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*cmd, str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with PeakSampler(proc.pid, interval=0.01) as sampler:
        out, err = proc.communicate()
    whole = time.perf_counter() - start
    if proc.returncode != 0:
        lines = (err or out).strip().splitlines()
        raise RuntimeError(f"peer {name} exited {proc.returncode}: {lines[-1] if lines else ''}")
    doc = json.loads(out.strip().splitlines()[-1])
    # the benchmark's own residual pass is no part of the user's loop, in either figure
    whole -= doc["residual_seconds"]
    return PeerRun(doc["seconds"], sampler.peak, doc["mean_residual"], doc["matrices"], whole)


def mergekit_config(base: Path, ft: Path) -> str:
    """The ``combine-ckpt`` edit as a mergekit config: ``base + 0.5 (ft - base)``, bf16."""
    return (
        "merge_method: task_arithmetic\n"
        f"base_model: {json.dumps(str(base))}\n"
        "models:\n"
        f"  - model: {json.dumps(str(ft))}\n"
        "    parameters:\n"
        "      weight: 0.5\n"
        "parameters:\n"
        "  normalize: false\n"
        "dtype: bfloat16\n"
    )


def _run_mergekit(base: Path, ft: Path, workdir: Path) -> PeerRun:
    """``mergekit-yaml`` on the pair in a child process: its whole wall time and peak."""
    from streamvec.memory import PeakSampler

    config, out = workdir / "mergekit-task-arithmetic.yaml", workdir / "mergekit-out"
    config.write_text(mergekit_config(base, ft))
    shutil.rmtree(out, ignore_errors=True)
    exe = shutil.which("mergekit-yaml")
    cmd = [exe] if exe else [sys.executable, "-m", "mergekit.scripts.run_yaml"]
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*cmd, str(config), str(out), "--no-copy-tokenizer"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with PeakSampler(proc.pid, interval=0.01) as sampler:
            _, err = proc.communicate()
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            lines = err.strip().splitlines()
            raise RuntimeError(
                f"mergekit-yaml exited {proc.returncode}: {lines[-1] if lines else ''}"
            )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return PeerRun(seconds, sampler.peak, None, 0, seconds)


def peer_notes(
    step_seconds: list[float], step_residual: float | None, runs: dict[str, list[PeerRun]]
) -> dict[str, Any]:
    """What a record keeps of its peers: times side by side and the ratio of the medians.

    Args:
        step_seconds: the step's wall time per run (the runs the peers were interleaved with).
        step_residual: the step's mean relative residual (None: unknown).
        runs: peer name -> its runs.

    Returns:
        peer name -> ``seconds_all``, ``seconds`` (median), ``ratio`` (step median / peer
        median: below 1 is faster than the peer), ``process_seconds`` and ``process_ratio``
        (the same with the peer's whole process, start-up included), ``peak_anon_bytes``,
        ``mean_residual`` and the step's, ``niter``.
    """
    import statistics

    notes: dict[str, Any] = {}
    step = statistics.median(step_seconds)
    for name, peer_runs in runs.items():
        med = statistics.median(r.seconds for r in peer_runs)
        whole = statistics.median(r.process_seconds for r in peer_runs)
        notes[name] = {
            "seconds_all": [r.seconds for r in peer_runs],
            "seconds": med,
            "ratio": step / med if med > 0 else None,
            "process_seconds": whole,
            "process_ratio": step / whole if whole > 0 else None,
            "peak_anon_bytes": max(r.peak_anon_bytes for r in peer_runs),
            "mean_residual": peer_runs[-1].mean_residual,
            "step_mean_residual": step_residual,
            "niter": TORCH_NITER if name == TORCH else None,
        }
    return notes


def svd_store_mean_residual(path: Path) -> float | None:
    """The mean relative residual over the factored matrices of an SVD store."""
    from streamvec.io.zarr.lowrank import read_svd_store

    values = [
        e.attrs["svd"]["residual"] for e in read_svd_store(path).entries.values() if e.factored
    ]
    return sum(values) / len(values) if values else None


def torch_loop(store: Path, rank: int) -> dict[str, Any]:
    """The plain ``torch.svd_lowrank`` loop over every 2-D array of a store, timed."""
    import numpy as np
    import torch
    import zarr

    from streamvec.io.zarr.store import read_store

    arrays = [a for a in read_store(store).arrays.values() if len(a.shape) == 2]
    torch.manual_seed(0)
    residuals: list[float] = []
    seconds = checking = 0.0
    for info in arrays:
        start = time.perf_counter()  # timed: the read and the factorization, as a user's loop
        a = np.asarray(zarr.open_array(str(store), path=info.array_path, mode="r")[...])
        _, s, _ = torch.svd_lowrank(
            torch.from_numpy(a), q=min(rank + OVERSAMPLE, *a.shape), niter=TORCH_NITER
        )
        seconds += time.perf_counter() - start
        # untimed: the residual from ||A||^2 - sum S^2, as streamvec records it
        start = time.perf_counter()
        k = min(rank, *a.shape)
        a2 = float(np.sum(a.astype(np.float64) ** 2))
        kept = float(np.sum(s[:k].double().numpy() ** 2))
        residuals.append(float(np.sqrt(max(0.0, a2 - kept) / a2)) if a2 else 0.0)
        checking += time.perf_counter() - start
    values = residuals
    return {
        "seconds": seconds,
        "residual_seconds": checking,
        "mean_residual": sum(values) / len(values) if values else 0.0,
        "matrices": len(values),
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m streamvec.tools.benchmark.peers torch-svd-lowrank STORE RANK``: one JSON line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "torch-svd-lowrank":
        raise SystemExit(
            "usage: python -m streamvec.tools.benchmark.peers torch-svd-lowrank STORE RANK"
        )
    print(json.dumps(torch_loop(Path(args[1]), int(args[2]))))


if __name__ == "__main__":
    main()
