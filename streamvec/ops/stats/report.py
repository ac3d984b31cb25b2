"""The terminal table and ``stats.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from streamvec.ops.stats.result import Figures, Stats


def _num(x: float, fmt: str = ".3g") -> str:
    return "-" if not math.isfinite(x) else format(x, fmt)


def _pairs(names: tuple[str, ...]) -> list[tuple[int, int]]:
    return [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]


def figures_table(fig: Figures, title: str) -> str:
    """One line per group and task vector: size figures, then pairwise ones per pair."""
    names = fig.names
    lines = [title]
    head = f"{'group':<28} {'vector':<18} {'norm':>9} {'rel':>8} {'max|t|':>9} {'zeros':>6}"
    lines.append(head)
    for g, label in enumerate(fig.labels):
        for i, name in enumerate(names):
            lines.append(
                f"{label[:28]:<28} {name[:18]:<18} {_num(fig.norm[g, i]):>9} "
                f"{_num(fig.relative[g, i]):>8} {_num(fig.maxabs[g, i]):>9} "
                f"{_num(100 * fig.zero_fraction[g, i], '.0f'):>5}%"
            )
    pairs = _pairs(names)
    if pairs:
        lines.append("")
        lines.append(f"{'group':<28} {'pair':<30} {'cosine':>8} {'signs':>6} {'top-k':>6}")
        for g, label in enumerate(fig.labels):
            for i, j in pairs:
                pair = f"{names[i][:14]} ~ {names[j][:14]}"
                lines.append(
                    f"{label[:28]:<28} {pair:<30} {_num(fig.cosine[g, i, j], '+.3f'):>8} "
                    f"{_num(fig.sign_agreement[g, i, j], '.3f'):>6} "
                    f"{_num(fig.top_overlap[g, i, j], '.3f'):>6}"
                )
    return "\n".join(lines)


def rank_table(st: Stats) -> str:
    """The LoRA rank per module kind at the run's residual energy."""
    rows = st.lora_ranks()
    if not rows:
        return ""
    pct = f"{100 * st.residual:g}%"
    lines = [
        f"LoRA rank for <= {pct} residual energy per matrix (worst matrix / median), per module:"
    ]
    lines.append(f"{'module':<10} {'matrices':>8}  " + "  ".join(f"{n[:18]:>18}" for n in st.names))
    for r in rows:
        cells = []
        for i in range(len(st.names)):
            if r.known_to[i] == 0:
                cells.append(f"{'-':>18}")
            elif r.worst[i] is None:
                cells.append(f"{f'>{r.known_to[i]} ({r.above[i]} above)':>18}")
            else:
                med = r.median[i]
                cells.append(f"{f'{r.worst[i]} / {med:g}':>18}")
        lines.append(f"{r.kind:<10} {r.matrices:>8}  " + "  ".join(cells))
    if any(w is None for r in rows for w, k in zip(r.worst, r.known_to, strict=True) if k):
        lines.append(
            "  >K: the residual is still above the target after the K singular values known; "
            "rerun with a larger --spectrum K"
        )
    return "\n".join(lines)


def format_stats(st: Stats, per: str = "module") -> str:
    """The terminal report: overall figures, the chosen breakdown, LoRA ranks."""
    parts = [
        f"task vectors: {', '.join(st.names)}"
        + (f" (base {st.base})" if st.base else "")
        + f"; {len(st.kinds)} tensors",
        figures_table(st.overall, "overall"),
        figures_table(st.per(per), f"per {per}"),
    ]
    ranks = rank_table(st)
    if ranks:
        parts.append(ranks)
    if st.density > 0:
        parts.append(
            f"signs: magnitude-weighted sign agreement (0.5: unrelated); top-k: overlap of the "
            f"top {100 * st.density:g}% magnitudes (about {st.density:g} when unrelated)"
        )
    return "\n\n".join(parts)


def write_json(st: Stats, path: Path) -> Path:
    """``stats.json``: every figure (see ``definitions`` inside)."""
    path.write_text(json.dumps(st.to_dict(), indent=1, default=_default) + "\n")
    return path


def _default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o).__name__)
