"""Randomized SVD: streamvec against ``torch.svd_lowrank`` and full ``torch.linalg.svd``.

In memory, on float32 matrices that are low-rank plus noise (4096 x 4096 and 11008 x 4096,
the shapes of a 7B Llama's attention and MLP projections):

* ``streamvec``: :func:`streamvec.compute.linalg.randomized_svd` over a row-chunked dask array of
  the
  in-memory matrix (the same code the ``svd`` command streams from disk), rank K, oversample
  P, Q power iterations (QR-stabilised), threads scheduler, one BLAS thread per block product
  (as ``streamvec svd`` runs it);
* ``torch.svd_lowrank(A, q=K+P, niter=Q)``, truncated to K;
* ``torch.linalg.svd(A, full_matrices=False)``, truncated to K: the optimum.

Each gets its wall time and its relative Frobenius residual ``||A - U S Vh|| / ||A||``
(computed in float64 row block by row block), shown with its ratio to the optimal rank-K
residual from the full SVD's singular values.

Out of core: a 32000 x 4096 float32 task vector (524 MB; ``FINETUNED - BASE`` of two
safetensors files) is factored by ``streamvec svd`` in a fresh subprocess under a
``--memory-limit`` smaller than the matrix; its peak anonymous memory (``RssAnon + RssShmem +
VmSwap``, :class:`streamvec.memory.PeakSampler`, sampled every 10 ms) is reported with the
baseline of the process before the run. The optimal residual there comes from the eigenvalues of
``A^T A`` accumulated in float64 row block by row block.

    PYTHONPATH=. python bench/bench_svd.py [--rank 64] [--workdir DIR] [--skip-full]
        [--ooc-limit 480MB] [--json results.json] [--quick]

``--peers``: the in-memory comparison of the issue, methods interleaved round by round on
4096 x 4096, 11008 x 4096 and 32000 x 4096 at ranks 16 and 64 (``--shapes``, ``--ranks``):
streamvec's held path (auto, one and two power iterations; two with the Householder QR it used
before CholeskyQR2) and its streamed path (row blocks as dask tasks, as ``streamvec svd`` runs
a matrix larger than its memory limit),
``torch.svd_lowrank``, scikit-learn's ``randomized_svd`` and dask's
``svd_compressed(iterator="QR")``, each at one and two power iterations. Residuals are shown
against the exact truncated SVD's (from the float64 Gram matrix's eigenvalues); times are
medians of ``--rounds``, with ratios to ``torch.svd_lowrank`` at its default ``niter=2``.

    PYTHONPATH=. python bench/bench_svd.py --peers [--rounds 3] [--shapes 4096x4096,...]
        [--only "held, auto,niter=2"]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BLOCK = 2048  # rows per generated / checked block


def planted(m: int, n: int, rank: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Signal factors ``(U diag(s), V)`` with s_j = 50 * 0.95^j (j < rank) and a noise level.

    The noise (entries ``sigma = 0.01``) has singular values near ``0.01 (sqrt(m) + sqrt(n))``
    (1.3-2.4 here), about s_63: a rank-64 cut sits at the noise floor, the hard case for
    sketching.
    """
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    s = 50.0 * 0.95 ** np.arange(rank)
    return u * s, v, 0.01


def rows_of(us: np.ndarray, v: np.ndarray, noise: float, r0: int, r1: int, seed: int) -> np.ndarray:
    """Rows ``[r0, r1)`` of ``U diag(s) V^T + noise * N`` as float32 (noise keyed by block)."""
    rng = np.random.default_rng([seed, r0])
    block = us[r0:r1] @ v.T + noise * rng.standard_normal((r1 - r0, v.shape[0]))
    return block.astype(np.float32)


def make_matrix(m: int, n: int, seed: int) -> np.ndarray:
    us, v, noise = planted(m, n, 128, seed)
    out = np.empty((m, n), np.float32)
    for r0 in range(0, m, BLOCK):
        r1 = min(r0 + BLOCK, m)
        out[r0:r1] = rows_of(us, v, noise, r0, r1, seed)
    return out


def residual(a: np.ndarray, u: np.ndarray, s: np.ndarray, vh: np.ndarray) -> float:
    """``||A - U diag(S) Vh||_F / ||A||_F`` in float64, one row block at a time."""
    us = u.astype(np.float64) * s.astype(np.float64)
    vh64 = vh.astype(np.float64)
    num = den = 0.0
    for r0 in range(0, a.shape[0], BLOCK):
        blk = a[r0 : r0 + BLOCK].astype(np.float64)
        diff = blk - us[r0 : r0 + BLOCK] @ vh64
        num += float(np.vdot(diff, diff))
        den += float(np.vdot(blk, blk))
    return float(np.sqrt(num / den))


def timed(fn: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_in_memory(
    m: int, n: int, rank: int, oversample: int, power_iters: int, full: bool
) -> list[dict[str, Any]]:
    import dask.array as da
    import torch

    from streamvec.compute.linalg import randomized_svd
    from streamvec.compute.linalg.blas import limit_blas_threads
    from streamvec.model.tensor import rows_per_block

    a = make_matrix(m, n, seed=m)
    rows: list[dict[str, Any]] = []
    chunks = rows_per_block((m, n))
    # As `streamvec svd` runs it with the threads scheduler: one BLAS thread per block product
    # while Dask runs one product per core (streamvec.ops.svd.Factorizer.blas_limit).
    with limit_blas_threads(1):
        res, sec = timed(
            lambda: randomized_svd(
                da.from_array(a, chunks=(chunks, n)),
                rank,
                oversample=oversample,
                power_iters=power_iters,
                seed=0,
                compute_kwargs={"scheduler": "threads", "num_workers": os.cpu_count() or 1},
            )
        )
    rows.append(
        {
            "method": f"streamvec randomized_svd (q={power_iters}, p={oversample})",
            "seconds": sec,
            "residual": residual(a, res.U, res.S, res.Vh),
        }
    )
    # The same without the limit: Dask threads x OpenBLAS threads on the same cores.
    res, sec = timed(
        lambda: randomized_svd(
            da.from_array(a, chunks=(chunks, n)),
            rank,
            oversample=oversample,
            power_iters=power_iters,
            seed=0,
            compute_kwargs={"scheduler": "threads", "num_workers": os.cpu_count() or 1},
        )
    )
    rows.append(
        {
            "method": "  same, BLAS threads left at default",
            "seconds": sec,
            "residual": residual(a, res.U, res.S, res.Vh),
        }
    )
    t = torch.from_numpy(a)
    torch.manual_seed(0)
    (u, s, v), sec = timed(lambda: torch.svd_lowrank(t, q=rank + oversample, niter=power_iters))
    rows.append(
        {
            "method": f"torch.svd_lowrank (niter={power_iters}, q=K+{oversample})",
            "seconds": sec,
            "residual": residual(a, u[:, :rank].numpy(), s[:rank].numpy(), v[:, :rank].T.numpy()),
        }
    )
    optimal = None
    if full:
        (u, s, vh), sec = timed(lambda: torch.linalg.svd(t, full_matrices=False))
        s64 = s.double().numpy()
        optimal = float(np.sqrt(np.sum(s64[rank:] ** 2) / np.sum(s64**2)))
        rows.append(
            {
                "method": "torch.linalg.svd (full), truncated",
                "seconds": sec,
                "residual": residual(a, u[:, :rank].numpy(), s[:rank].numpy(), vh[:rank].numpy()),
            }
        )
    for r in rows:
        r.update(shape=f"{m} x {n}", rank=rank, optimal=optimal)
    return rows


def peer_methods(rank: int, oversample: int) -> dict[str, Any]:
    """name -> fn(a) returning (U, S, Vh) and the power iterations used."""
    import dask.array as da
    import torch
    from sklearn.utils.extmath import randomized_svd as sk_rsvd

    from streamvec.compute.linalg.rsvd import randomized_svd_in_memory

    width = rank + oversample

    def sv(q: int | None) -> Any:
        def run(a: np.ndarray) -> tuple[Any, ...]:
            r = randomized_svd_in_memory(a, rank, oversample=oversample, power_iters=q)
            return r.U, r.S, r.Vh, r.power_iters

        return run

    def householder(q: int) -> Any:
        # The held path as it was before CholeskyQR2: its sketches orthonormalised by LAPACK.
        from streamvec.compute.linalg import rsvd
        from streamvec.compute.linalg.blas import limit_blas_threads

        def orthonormal(y: np.ndarray) -> np.ndarray:
            with limit_blas_threads(1):
                return np.linalg.qr(y)[0]

        def run(a: np.ndarray) -> tuple[Any, ...]:
            current, rsvd._orthonormal = rsvd._orthonormal, orthonormal
            try:
                return sv(q)(a)
            finally:
                rsvd._orthonormal = current

        return run

    def torch_lowrank(q: int) -> Any:
        def run(a: np.ndarray) -> tuple[Any, ...]:
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(torch.from_numpy(a), q=width, niter=q)
            return u[:, :rank].numpy(), s[:rank].numpy(), v[:, :rank].T.numpy(), q

        return run

    def sklearn(q: int) -> Any:
        def run(a: np.ndarray) -> tuple[Any, ...]:
            u, s, vh = sk_rsvd(
                a,
                rank,
                n_oversamples=oversample,
                n_iter=q,
                power_iteration_normalizer="QR",
                random_state=0,
            )
            return u, s, vh, q

        return run

    def dask_qr(q: int) -> Any:
        def run(a: np.ndarray) -> tuple[Any, ...]:
            x = da.from_array(a, chunks=(min(a.shape[0], 8192), a.shape[1]))
            u, s, vh = da.linalg.svd_compressed(
                x,
                rank,
                n_power_iter=q,
                n_oversamples=oversample,
                iterator="QR",
                seed=0,
                compute=False,
            )
            u, s, vh = da.compute(u, s, vh)
            return u, s, vh, q

        return run

    def streamed(a: np.ndarray) -> tuple[Any, ...]:
        # As `streamvec svd` streams a matrix larger than its memory limit: row blocks of
        # 32 MB as dask tasks, 2 workers, one BLAS thread per block product.
        from streamvec.compute.linalg.blas import limit_blas_threads
        from streamvec.compute.linalg.rsvd import randomized_svd
        from streamvec.model.tensor import rows_per_block

        x = da.from_array(a, chunks=(rows_per_block(a.shape), a.shape[1]))
        with limit_blas_threads(1):
            r = randomized_svd(
                x,
                rank,
                oversample=oversample,
                compute_kwargs={"scheduler": "threads", "num_workers": 2},
            )
        return r.U, r.S, r.Vh, r.power_iters

    return {
        "streamvec held, auto q": sv(None),
        "streamvec held, q=1": sv(1),
        "streamvec held, q=2": sv(2),
        "streamvec held, q=2, Householder QR": householder(2),
        "streamvec streamed, auto q": streamed,
        "torch.svd_lowrank niter=1": torch_lowrank(1),
        "torch.svd_lowrank niter=2": torch_lowrank(2),
        "sklearn randomized_svd n_iter=1 (QR)": sklearn(1),
        "sklearn randomized_svd n_iter=2 (QR)": sklearn(2),
        "dask svd_compressed QR q=1": dask_qr(1),
        "dask svd_compressed QR q=2": dask_qr(2),
    }


def bench_peers(args: argparse.Namespace) -> None:
    import statistics

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    print(f"# load {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs, rounds {args.rounds}")
    for m, n in shapes:
        a = make_matrix(m, n, seed=m)
        optimal = optimal_residuals(a, ranks)
        for rank in ranks:
            methods = peer_methods(rank, args.oversample)
            if args.only:
                wanted = args.only.split(",")
                methods = {k: f for k, f in methods.items() if any(w in k for w in wanted)}
                methods.setdefault(
                    "torch.svd_lowrank niter=2",
                    peer_methods(rank, args.oversample)["torch.svd_lowrank niter=2"],
                )
            times: dict[str, list[float]] = {k: [] for k in methods}
            res: dict[str, tuple[float, int]] = {}
            for _ in range(args.rounds):  # interleaved
                for name, fn in methods.items():
                    (u, s, vh, q), sec = timed(lambda fn=fn, a=a: fn(a))
                    times[name].append(sec)
                    res[name] = (residual(a, np.asarray(u), np.asarray(s), np.asarray(vh)), q)
            ref = optimal[rank]
            torch_s = statistics.median(times["torch.svd_lowrank niter=2"])
            for name in methods:
                med = statistics.median(times[name])
                r, q = res[name]
                print(
                    f"{m:>6} x {n:<5} k={rank:<3} | {name:<40} | q={q} | {med:6.2f} s "
                    f"({med / torch_s:4.2f}x torch niter=2) | residual {r:.6f} "
                    f"({r / ref:.4f}x exact)",
                    flush=True,
                )
            print(f"# load {os.getloadavg()[0]:.1f}")


def optimal_residuals(a: np.ndarray, ranks: list[int]) -> dict[int, float]:
    """The exact truncated SVD's relative residual at each rank (float64 Gram eigenvalues)."""
    gram = np.zeros((a.shape[1], a.shape[1]))  # (n, n)
    for r0 in range(0, a.shape[0], BLOCK):
        blk = a[r0 : r0 + BLOCK].astype(np.float64)
        gram += blk.T @ blk
    eig = np.sort(np.linalg.eigvalsh(gram))[::-1]
    total = float(eig.sum())
    return {k: float(np.sqrt(max(0.0, total - float(eig[:k].sum())) / total)) for k in ranks}


def write_pair(root: Path, m: int, n: int, seed: int) -> tuple[Path, Path]:
    """BASE and FINETUNED safetensors (float32) whose difference is the planted matrix."""
    from streamvec.io.safetensors.layout import TensorSpec
    from streamvec.io.safetensors.writer import ShardedSafetensorsWriter

    us, v, noise = planted(m, n, 128, seed)
    paths = []
    for name in ("base", "ft"):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        spec = [TensorSpec("w", np.dtype(np.float32), (m, n))]
        with ShardedSafetensorsWriter(d, spec, shard_size=1 << 40) as w:
            w.create()
            for r0 in range(0, m, BLOCK):
                r1 = min(r0 + BLOCK, m)
                # base: small weights; ft = base + delta, rounded once to float32.
                rng = np.random.default_rng([seed, 7, r0])
                base = (0.02 * rng.standard_normal((r1 - r0, n))).astype(np.float32)
                block = base if name == "base" else (base + rows_of(us, v, noise, r0, r1, seed))
                w.write_rows("w", r0, block.astype(np.float32))
            w.finish()
        paths.append(d)
    return paths[0], paths[1]


def optimal_from_gram(base: Path, ft: Path, rank: int) -> float:
    """Optimal rank-K residual of ft - base from the eigenvalues of the float64 Gram matrix."""
    import streamvec as sv

    t = (sv.open(ft) - sv.open(base))["w"]
    m, n = t.shape
    gram = np.zeros((n, n))
    for r0 in range(0, m, BLOCK):
        blk = t.read_rows(r0, min(r0 + BLOCK, m)).astype(np.float64)
        gram += blk.T @ blk
    eig = np.sort(np.linalg.eigvalsh(gram))[::-1]
    return float(np.sqrt(max(0.0, float(eig.sum() - eig[:rank].sum())) / float(eig.sum())))


def child(args: argparse.Namespace) -> None:
    """The out-of-core run, alone in its process so the memory figures are its own."""
    from streamvec.io.zarr.lowrank import read_svd_store
    from streamvec.memory import PeakSampler, anon_bytes
    from streamvec.ops.svd import RunOptions, SVDOptions, svd

    out = Path(args.workdir) / "svd.zarr"
    shutil.rmtree(out, ignore_errors=True)
    opts = SVDOptions(rank=args.rank, oversample=args.oversample, power_iters=args.power_iters)
    baseline = anon_bytes()
    with PeakSampler() as sampler:
        _, sec = timed(
            lambda: svd(
                Path(args.workdir) / "ft",
                out,
                options=opts,
                base=Path(args.workdir) / "base",
                run=RunOptions(memory_limit=args.ooc_limit, progress=False),
            )
        )
    attrs = read_svd_store(out).entries["w"].attrs["svd"]
    print(json.dumps({"seconds": sec, "peak": sampler.peak, "baseline": baseline, **attrs}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--oversample", type=int, default=10)
    p.add_argument("--power-iters", type=int, default=2)
    p.add_argument("--skip-full", action="store_true", help="skip torch.linalg.svd (slow)")
    p.add_argument("--skip-ooc", action="store_true", help="skip the out-of-core run")
    p.add_argument("--ooc-rows", type=int, default=32000)
    p.add_argument("--ooc-limit", default="480MB", help="memory limit of the out-of-core run")
    p.add_argument("--workdir", help="where the out-of-core checkpoints go (default: a temp dir)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--quick", action="store_true", help="small shapes: a smoke test of the script")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--peers", action="store_true", help="the in-memory comparison with peers")
    p.add_argument("--shapes", default="4096x4096,11008x4096,32000x4096")
    p.add_argument("--ranks", default="16,64")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--only",
        help="with --peers: only the methods whose names contain one of these (comma "
        "separated; torch.svd_lowrank niter=2, the reference, always runs)",
    )
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if args.peers:
        bench_peers(args)
        return

    import torch

    from streamvec.units import format_bytes, parse_size

    print(f"# {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    results: dict[str, Any] = {"in_memory": [], "out_of_core": None}
    shapes = ((1024, 1024), (2752, 1024)) if args.quick else ((4096, 4096), (11008, 4096))
    if args.quick:
        args.ooc_rows = 4000
    for m, n in shapes:
        rows = bench_in_memory(
            m, n, args.rank, args.oversample, args.power_iters, not args.skip_full
        )
        results["in_memory"].extend(rows)
        for r in rows:
            ratio = f"{r['residual'] / r['optimal']:.4f}" if r["optimal"] else "-"
            print(
                f"{r['shape']:>12} | {r['method']:<45} | {r['seconds']:7.2f} s | "
                f"residual {r['residual']:.5f} | x optimal {ratio}",
                flush=True,
            )

    if not args.skip_ooc:
        tmp = None
        workdir = Path(args.workdir) if args.workdir else Path(tmp := tempfile.mkdtemp())
        try:
            m, n = args.ooc_rows, shapes[0][1]
            base, ft = write_pair(workdir, m, n, seed=11)
            optimal = optimal_from_gram(base, ft, args.rank)
            for f in (base, ft):  # warm the page cache: measure compute, not the first read
                for shard in f.glob("*.safetensors"):
                    with open(shard, "rb") as fh:
                        while fh.read(1 << 24):
                            pass
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--workdir",
                str(workdir),
                "--rank",
                str(args.rank),
                "--oversample",
                str(args.oversample),
                "--power-iters",
                str(args.power_iters),
                "--ooc-limit",
                args.ooc_limit,
            ]
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(
                shape=f"{m} x {n}",
                matrix_bytes=m * n * 4,
                limit=parse_size(args.ooc_limit),
                optimal=optimal,
            )
            results["out_of_core"] = r
            print(
                f"{r['shape']:>12} | streamvec svd FT --base BASE, --memory-limit {args.ooc_limit} "
                f"(matrix {format_bytes(m * n * 4)}) | {r['seconds']:.2f} s | method "
                f"{r['method']}, block_rows {r['block_rows']}, passes {r['passes']} | residual "
                f"{r['residual']:.5f} | x optimal {r['residual'] / optimal:.4f} | peak anon "
                f"{format_bytes(r['peak'])} (baseline {format_bytes(r['baseline'])})"
            )
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
