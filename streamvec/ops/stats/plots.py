"""PNG plots of a :class:`~streamvec.ops.stats.result.Stats`: heat maps, norm profiles, spectra.

Each figure has a title naming what is shown, axis labels with units, and the task vectors'
names on the axes, so a plot read alone says what it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streamvec.ops.stats.grouping import KINDS

if TYPE_CHECKING:  # for annotations only: Stats.plot imports this module
    from streamvec.ops.stats.result import Figures, Stats


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _heatmaps(
    panels: list[tuple[str, np.ndarray]],
    names: tuple[str, ...],
    title: str,
    cbar: str,
    vmin: float,
    vmax: float,
    cmap: str,
    path: Path,
) -> Path:
    plt = _pyplot()
    n = len(names)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    side = max(2.6, 0.45 * n + 1.6)
    fig, axes = plt.subplots(
        rows, cols, figsize=(side * cols + 1.2, side * rows + 0.9), squeeze=False
    )
    image = None
    for ax, (label, m) in zip(axes.flat, panels, strict=False):
        image = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap)
        ax.set_title(label, fontsize=10)
        ax.set_xticks(range(n), [s[:16] for s in names], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), [s[:16] for s in names], fontsize=8)
        if n <= 8:
            for i in range(n):
                for j in range(n):
                    v = m[i, j]
                    text = (
                        "-" if not np.isfinite(v) else (f"{v:.3f}" if abs(v) < 0.1 else f"{v:.2f}")
                    )
                    # dark text on light cells, light text on dark ones, whatever the map
                    r, g, b, _ = image.cmap(image.norm(v)) if np.isfinite(v) else (1, 1, 1, 1)
                    color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                    ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    if image is not None:
        cax = fig.add_axes((0.86, 0.15, 0.02, 0.7))
        fig.colorbar(image, cax=cax, label=cbar)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _panels(st: Stats, value: Callable[[Figures], np.ndarray]) -> list[tuple[str, np.ndarray]]:
    out = [("all tensors", value(st.overall)[0])]
    mod = st.per_module
    for g, label in enumerate(mod.labels):
        count = int(mod.tensors[g])
        out.append((f"{label} ({count} tensor{'s' if count != 1 else ''})", value(mod)[g]))
    return out


def plot_cosine(st: Stats, path: Path) -> Path:
    """Cosine similarity heat maps, overall and per module kind."""
    return _heatmaps(
        _panels(st, lambda f: f.cosine),
        st.names,
        "Cosine similarity of task vectors (Gram matrix in float64)",
        "cosine similarity (-1..1)",
        -1.0,
        1.0,
        "RdBu_r",
        path,
    )


def plot_signs(st: Stats, path: Path) -> Path:
    """Magnitude-weighted sign agreement heat maps."""
    return _heatmaps(
        _panels(st, lambda f: f.sign_agreement),
        st.names,
        "Sign agreement weighted by |tau_i tau_j| (0.5: unrelated signs, 1: no conflict)",
        "share of |tau_i tau_j| with equal signs",
        0.0,
        1.0,
        "PuOr",
        path,
    )


def plot_top_overlap(st: Stats, path: Path) -> Path:
    """Overlap of the top-density magnitude sets."""
    pct = f"{100 * st.density:g}%"
    return _heatmaps(
        _panels(st, lambda f: f.top_overlap),
        st.names,
        f"Overlap of the top-{pct} magnitude entries per tensor "
        f"(about {st.density:g} if unrelated)",
        "|T_i & T_j| / sqrt(|T_i| |T_j|)",
        0.0,
        1.0,
        "viridis",
        path,
    )


def plot_norms(st: Stats, path: Path) -> Path:
    """Per-layer norm profile of each task vector (relative to the base when given)."""
    plt = _pyplot()
    lay = st.per_layer
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    if lay.labels:
        x = [int(v) for v in lay.labels]
        rel = st.base is not None
        values = lay.relative if rel else lay.norm
        for i, name in enumerate(st.names):
            ax.plot(x, values[:, i], marker="o", ms=3, label=name)
        ax.set_xlabel("layer")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("||tau|| / ||base|| of the layer" if rel else "||tau|| of the layer (L2)")
        if np.nanmax(values) > 0 and np.nanmin(values[values > 0], initial=np.inf) > 0:
            lo, hi = np.nanmin(values[values > 0]), np.nanmax(values)
            if hi / lo > 30:
                ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, "no numbered layers among the tensors", ha="center", va="center")
        ax.axis("off")
    ax.set_title("Task-vector size per layer" + (" relative to the base" if st.base else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_spectra(st: Stats, path: Path) -> Path:
    """Residual energy after rank r per module kind and task vector (the LoRA-rank curve)."""
    plt = _pyplot()
    kind_of = dict(zip(st.per_tensor.labels, st.kinds, strict=True))
    kinds = [k for k in KINDS if any(kind_of[t] == k for t in st.spectra)]
    cols = min(3, len(kinds))
    rows = math.ceil(len(kinds) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, kind in zip(axes.flat, kinds, strict=False):
        for name, specs in st.spectra.items():
            if kind_of[name] != kind:
                continue
            for i, sp in enumerate(specs):
                if sp is None or sp.energy <= 0:
                    continue
                r = np.arange(1, sp.s.size + 1)
                first = name == next(t for t in st.spectra if kind_of[t] == kind)
                ax.plot(
                    r,
                    100 * np.maximum(sp.residual(), 1e-6),
                    color=colors[i % len(colors)],
                    alpha=0.6,
                    lw=1,
                    label=st.names[i] if first else None,
                )
        ax.axhline(100 * st.residual, color="gray", ls="--", lw=1)
        ax.set_yscale("log")
        ax.set_title(f"{kind}", fontsize=10)
        ax.set_xlabel("rank r")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("residual energy after rank r (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(kinds) :]:
        ax.axis("off")
    fig.suptitle(
        f"Spectra: 1 - sum(s_k^2, k<=r) / ||tau||^2 per matrix; dashed: {100 * st.residual:g}%",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_subspace(st: Stats, path: Path) -> Path:
    """Mean subspace overlap ``||U_i^T U_j||_F^2 / K`` over each module kind's matrices."""
    kind_of = dict(zip(st.per_tensor.labels, st.kinds, strict=True))
    panels = []
    every = [m for m in st.subspace.values()]
    panels.append((f"all matrices ({len(every)})", np.nanmean(np.stack(every), axis=0)))
    for kind in KINDS:
        ms = [m for t, m in st.subspace.items() if kind_of[t] == kind]
        if ms:
            what = "matrices" if len(ms) != 1 else "matrix"
            panels.append((f"{kind} ({len(ms)} {what})", np.nanmean(np.stack(ms), axis=0)))
    return _heatmaps(
        panels,
        st.names,
        "Subspace overlap of top-K left singular vectors, mean over matrices",
        "||U_i^T U_j||_F^2 / K (0..1)",
        0.0,
        1.0,
        "magma",
        path,
    )


def plot_all(st: Stats, directory: Path) -> list[Path]:
    """Every plot that has data, into ``directory``.

    Returns:
        The PNG paths written.
    """
    import warnings

    directory.mkdir(parents=True, exist_ok=True)
    out = [
        plot_cosine(st, directory / "cosine.png"),
        plot_norms(st, directory / "norms_per_layer.png"),
        plot_signs(st, directory / "sign_agreement.png"),
    ]
    if st.density > 0:
        out.append(plot_top_overlap(st, directory / "top_overlap.png"))
    if st.spectra:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # mean of all-NaN panels
            out.append(plot_subspace(st, directory / "subspace_overlap.png"))
        out.append(plot_spectra(st, directory / "spectra.png"))
    return out
