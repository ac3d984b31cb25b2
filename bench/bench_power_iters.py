"""How many power iterations the randomized SVD needs, against the exact residual.

For each matrix and rank, the held-path randomized SVD
(:func:`streamvec.compute.linalg.randomized_svd_in_memory`, oversample 10) is run with 0, 1, 2
and 3 forced power iterations and with the automatic rule; each residual is shown as a ratio
to the exact truncated SVD's (float64 Gram eigenvalues), with what the rule predicted after
each iteration (the remaining improvement ``rho / (1 - rho) * gain`` of
:func:`streamvec.compute.linalg.rsvd.converged`) and how many iterations it chose.

Matrices: the planted spectrum of ``bench/bench_svd.py`` (128 singular values
``50 * 0.95^j`` plus noise 0.01; ``--shapes``) and, with ``--pair BASE FT``, the task vectors
``FT - BASE`` of the 2-D weights of two safetensors checkpoints (``streamvec synth``
fine-tunes; ``--tensors`` of them, largest first).

    PYTHONPATH=. python bench/bench_power_iters.py [--shapes 4096x4096,11008x4096]
        [--ranks 16,64] [--pair BASE FT] [--tensors 6]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_svd import make_matrix, optimal_residuals

from streamvec.compute.linalg import rsvd


def task_vectors(base: Path, ft: Path, count: int) -> Iterator[tuple[str, np.ndarray]]:
    """The largest ``count`` 2-D task vectors ``ft - base`` (float32) of two checkpoints."""
    from safetensors import safe_open

    def files(p: Path) -> list[Path]:
        return sorted(p.glob("*.safetensors")) if p.is_dir() else [p]

    shapes: dict[str, tuple[Path, Path, int]] = {}
    for fb, ff in zip(files(base), files(ft), strict=True):
        with safe_open(str(fb), "np") as h:
            for name in h.keys():
                shape = h.get_slice(name).get_shape()
                if len(shape) == 2 and min(shape) > 256:
                    shapes[name] = (fb, ff, shape[0] * shape[1])
    # one of each shape first (q/k/v/o, gate/up, down), largest first
    seen, order = set(), []
    for name, (_, _, size) in sorted(shapes.items(), key=lambda kv: -kv[1][2]):
        key = (size, name.rsplit(".", 2)[-2])
        if key not in seen:
            seen.add(key)
            order.append(name)
    for name in order[:count]:
        fb, ff, _ = shapes[name]
        with safe_open(str(fb), "pt") as hb, safe_open(str(ff), "pt") as hf:
            tau = hf.get_tensor(name).float() - hb.get_tensor(name).float()
        yield name, tau.numpy()


def planted(shapes: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    for i, shape in enumerate(shapes):
        m, n = (int(x) for x in shape.split("x"))
        yield f"planted {shape}", make_matrix(m, n, seed=i)


def measure(name: str, a: np.ndarray, ranks: list[int]) -> None:
    exact = optimal_residuals(a, ranks)
    for rank in ranks:
        fixed = [rsvd.randomized_svd_in_memory(a, rank, power_iters=q).residual for q in range(4)]
        predictions: list[str] = []
        real = rsvd.converged

        def logged(
            previous: float,
            current: float,
            ritz: np.ndarray,
            k: int,
            log: list[str] = predictions,
            real: Callable[..., bool] = real,
        ) -> bool:
            gain = max(previous - current, 0.0) / current if current > 0 else 0.0
            top, tail = float(ritz[k - 1]), float(ritz[-1])
            rho = (tail / top) ** 2 if top > 0 else 1.0
            log.append(f"gain {gain:.4f} rho {rho:.3f} pred {rho / (1 - rho) * gain:.4f}")
            return real(previous, current, ritz, k)

        rsvd.converged = logged  # type: ignore[assignment]
        try:
            auto = rsvd.randomized_svd_in_memory(a, rank)
        finally:
            rsvd.converged = real  # type: ignore[assignment]
        ratios = " ".join(f"q={q}:{r / exact[rank]:.4f}" for q, r in enumerate(fixed))
        print(
            f"{name:48s} k={rank:3d} exact {exact[rank]:.5f}  {ratios}  auto q={auto.power_iters}"
            f" ({auto.residual / exact[rank]:.4f})  [{'; '.join(predictions)}]",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--pair", nargs=2, type=Path, metavar=("BASE", "FT"))
    ap.add_argument("--tensors", type=int, default=6)
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    sources = [planted([s for s in args.shapes.split(",") if s])]
    if args.pair:
        sources.append(task_vectors(args.pair[0], args.pair[1], args.tensors))
    for source in sources:
        for name, a in source:
            measure(name, a, ranks)


if __name__ == "__main__":
    main()
