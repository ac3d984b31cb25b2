"""PNG plots of a ``streamvec bench`` run, drawn from its results JSON.

Three figures, written next to ``bench.json``:

- ``*-throughput.png``: per step, the engine's input GB/s against model size (solid) and the
  rate plain sequential I/O of the same bytes reaches on the same machine in the same run,
  ``input_bytes / roofline_seconds`` (dashed);
- ``*-memory.png``: per step, peak anonymous memory against model size, with the memory limit
  the engine was given;
- ``*-time-split.png``: per (size, step), where the wall time went: the engine's per-block
  stages (worker-seconds divided by workers, so they add up to wall time), the time the
  blocks' wall clock saw beyond them, setup, finish and process start-up, next to the
  measured wall time.

matplotlib is an optional dependency (``pip install 'streamvec[bench]'``); it is imported only
here, with the Agg backend and no pyplot state, so plotting works on machines without a
display.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# Stages of the engine's block tasks, as RunReport.stage_seconds names them.
BLOCK_STAGES = ("read", "compute", "encode", "write", "checksum")
# The time-split segments beyond the block stages.
OTHER = "other in blocks (waiting, scheduling)"
SETUP = "setup (plan, create output)"
FINISH = "finish (durable flush, metadata, rename)"
STARTUP = "start-up (interpreter, imports, headers)"
# Segment -> colour of the time-split bars (fixed, so figures compare across runs).
SEGMENT_COLOURS = {
    "read": "#4c72b0",
    "compute": "#dd8452",
    "encode": "#55a868",
    "write": "#c44e52",
    "checksum": "#8172b3",
    OTHER: "#cccccc",
    SETUP: "#937860",
    FINISH: "#da8bc3",
    STARTUP: "#8c8c8c",
}
WALL_COLOUR = "#222222"
# Markers of one size would sit on top of each other: each step's series is shifted
# sideways by this many points (the x values themselves are not changed).
DODGE_POINTS = 7.0


def available() -> bool:
    """Whether matplotlib can be imported (it is the optional ``bench`` extra)."""
    return importlib.util.find_spec("matplotlib") is not None


def write_plots(data: Mapping[str, Any], directory: Path, prefix: str = "bench") -> list[str]:
    """Draw the three figures of a bench results dict into ``directory``; their file names."""
    results = list(data.get("results", []))
    if not results:
        return []
    note = footnote(data)
    figures = {
        "throughput": plot_throughput,
        "memory": plot_memory,
        "time-split": plot_time_split,
    }
    names = []
    for kind, draw in figures.items():
        fig = draw(results)
        _add_footnote(fig, note)
        name = f"{prefix}-{kind}.png"
        fig.savefig(directory / name, dpi=110)
        names.append(name)
    return names


# -- the data behind the figures (plain Python, testable without matplotlib) -----------------


def steps_in_order(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """The steps present, in the order they first appear (the order they ran)."""
    return list(dict.fromkeys(r["step"] for r in results))


def series(results: Sequence[Mapping[str, Any]], step: str) -> list[Mapping[str, Any]]:
    """One step's records, by model size."""
    return sorted((r for r in results if r["step"] == step), key=lambda r: r["params"])


def roofline_gbps(record: Mapping[str, Any]) -> float:
    """Input GB/s of plain sequential I/O of the step's bytes: input over roofline seconds."""
    return float(record["input_bytes"] / record["roofline_seconds"] / 1e9)


def time_split(record: Mapping[str, Any]) -> list[tuple[str, float]]:
    """Where a step's wall time went, as (segment, seconds) adding up to about its wall time.

    Block stages are worker-seconds (summed over parallel workers), so each is divided by the
    workers to compare with wall time. Empty without the engine's per-stage report.
    """
    stages = record.get("stage_seconds")
    if not stages:
        return []
    workers = record.get("engine_workers") or record.get("workers") or 1
    parts = [(s, float(stages.get(s, 0.0)) / workers) for s in BLOCK_STAGES]
    blocks_wall = float(stages.get("blocks_wall", 0.0))
    finish = float(stages.get("finish_wall", 0.0))
    # Wall time of the blocks beyond their stages: workers waiting or idle, scheduling.
    parts.append((OTHER, max(blocks_wall - sum(v for _, v in parts), 0.0)))
    engine = record.get("engine_seconds")
    if engine is not None:
        parts.append((SETUP, max(float(engine) - blocks_wall - finish, 0.0)))
    parts.append((FINISH, finish))
    if record.get("startup_seconds") is not None:
        parts.append((STARTUP, float(record["startup_seconds"])))
    return parts


def footnote(data: Mapping[str, Any]) -> str:
    """Machine, load, cache mode and run mode: what the reader needs to weigh the figures."""
    machine = data.get("machine", {})
    settings = data.get("settings", {})
    results = data.get("results", [])
    loads = [x for r in results for x in r.get("notes", {}).get("load_average_1min_all", []) if x]
    load_range = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a"
    caches = ", ".join(dict.fromkeys(r.get("cache", "?") for r in results))
    return (
        f"{machine.get('cpus', '?')} CPUs, {machine.get('memory_bytes', 0) / 2**30:.0f} GiB RAM; "
        f"1-min load average at run starts {load_range}; page cache: {caches}; "
        f"steps run {settings.get('mode', '?')}, medians of {settings.get('repeat', '?')}; "
        f"streamvec {machine.get('streamvec', '?')}"
    )


# -- figures ----------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    # A bare Figure renders through the Agg canvas when saved: no pyplot, no global backend.
    from matplotlib.figure import Figure
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    # The layout leaves a strip at the bottom for the footnote.
    strip = 0.3 / height
    layout = ConstrainedLayoutEngine(rect=(0, strip, 1, 1 - strip))
    return Figure(figsize=(width, height), layout=layout)


def _add_footnote(fig: Any, text: str) -> None:
    fig.text(0.01, 0.01, text, fontsize=7, color="#555555", ha="left", va="bottom")


def _plot_dodged(
    fig: Any, ax: Any, index: int, count: int, x: list[float], y: list[float], *a: Any, **kw: Any
) -> None:
    """Plot series ``index`` of ``count`` shifted a few points sideways (x values unchanged)."""
    from matplotlib.transforms import offset_copy

    shift = (index - (count - 1) / 2) * DODGE_POINTS
    moved = offset_copy(ax.transData, fig=fig, x=shift, y=0, units="points")
    ax.plot(x, y, *a, transform=moved, **kw)
    # A line drawn through another transform does not widen the axes' limits by itself.
    ax.update_datalim(list(zip(x, y, strict=True)))
    ax.autoscale_view()


def _size_axis(ax: Any, results: Sequence[Mapping[str, Any]]) -> None:
    """x = parameters; log scale when there is more than one size; ticks named by size."""
    from matplotlib.ticker import NullLocator

    sizes = {r["params"]: r["size"] for r in results}
    if len(sizes) > 1:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
    else:
        (only,) = sizes
        ax.set_xlim(only * 0.5, only * 1.5)
    ax.set_xticks(sorted(sizes), labels=[sizes[p] for p in sorted(sizes)])
    ax.set_xlabel("model size (parameters)")


def _log_y(ax: Any) -> None:
    """A log y axis labelled with plain numbers (0.2, 1, 50), not powers of ten.

    Minor ticks at 2 and 5 are labelled only over less than two decades, where they do not
    crowd the axis.
    """
    from matplotlib.ticker import FuncFormatter

    def minor(value: float, _pos: int) -> str:
        low, high = ax.get_ylim()
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
        return f"{value:g}" if high / low < 100 and mantissa in (2, 5) else ""

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def plot_throughput(results: Sequence[Mapping[str, Any]]) -> Any:
    """Engine input GB/s (solid) and the roofline-equivalent rate (dashed) per step."""
    fig, ax = _size_figure()
    for i, n, step, rows, colour in _per_step(results):
        x = [r["params"] for r in rows]
        engine = [r["input_gbps"] for r in rows]
        roof = [roofline_gbps(r) for r in rows]
        _plot_dodged(fig, ax, i, n, x, engine, "o-", color=colour, label=f"{step}: engine")
        _plot_dodged(
            fig,
            ax,
            i,
            n,
            x,
            roof,
            "s--",
            color=colour,
            mfc="none",
            label=f"{step}: plain I/O of the same bytes",
        )
    _finish_size_plot(
        ax,
        results,
        "input throughput (GB/s of input read, log scale)",
        "Input throughput against model size\n"
        "solid: the step; dashed: plain sequential read of its inputs + write of its output",
    )
    return fig


def _size_figure() -> tuple[Any, Any]:
    """A figure with one axes for a plot against model size."""
    fig = _figure(9, 5.5)
    return fig, fig.add_subplot()


def _per_step(
    results: Sequence[Mapping[str, Any]],
) -> Iterator[tuple[int, int, str, list[Mapping[str, Any]], str]]:
    """(index, step count, step, its records by size, its colour) for each step in order."""
    steps = steps_in_order(results)
    colours = _step_colours(steps)
    for i, step in enumerate(steps):
        yield i, len(steps), step, series(results, step), colours[step]


def _finish_size_plot(
    ax: Any, results: Sequence[Mapping[str, Any]], ylabel: str, title: str
) -> None:
    """Size axis, log y, labels, grid and legend of a plot against model size."""
    _size_axis(ax, results)
    _log_y(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_memory(results: Sequence[Mapping[str, Any]]) -> Any:
    """Peak anonymous memory per step against model size, with the memory limit."""
    fig, ax = _size_figure()
    for i, n, step, rows, colour in _per_step(results):
        x = [r["params"] for r in rows]
        peak = [r["peak_anon_bytes"] / 2**20 for r in rows]
        _plot_dodged(fig, ax, i, n, x, peak, "o-", color=colour, label=step)
    for limit in sorted({r["memory_limit_bytes"] for r in results}):
        ax.axhline(limit / 2**20, color="#c44e52", ls="--", lw=1.2)
        ax.annotate(
            f"memory limit {limit / 2**30:.1f} GiB",
            (0.01, limit / 2**20),
            xycoords=("axes fraction", "data"),
            va="bottom",
            fontsize=8,
            color="#c44e52",
        )
    _finish_size_plot(
        ax,
        results,
        "peak anonymous memory (MiB, log scale)\nRssAnon + RssShmem + VmSwap",
        "Peak anonymous memory against model size\n"
        "(page cache of the memory-mapped inputs not counted: the kernel can drop it)",
    )
    return fig


def plot_time_split(results: Sequence[Mapping[str, Any]]) -> Any:
    """Per (size, step): stacked time split next to the measured wall time."""
    rows = list(results)
    fig = _figure(10, 1.2 + 0.75 * len(rows))
    ax = fig.add_subplot()
    seen: set[str] = set()
    for i, r in enumerate(rows):
        y = len(rows) - 1 - i  # first record on top
        left = 0.0
        for label, seconds in time_split(r):
            ax.barh(
                y + 0.18,
                seconds,
                left=left,
                height=0.34,
                color=SEGMENT_COLOURS[label],
                label=label if label not in seen else None,
            )
            seen.add(label)
            left += seconds
        if not r.get("stage_seconds"):
            ax.text(0, y + 0.18, "  no per-stage report for this step", va="center", fontsize=7)
        ax.barh(
            y - 0.18,
            r["seconds"],
            height=0.34,
            color=WALL_COLOUR,
            label="measured wall time" if "wall" not in seen else None,
        )
        seen.add("wall")
    ax.set_yticks(range(len(rows)), labels=[f"{r['size']} {r['step']}" for r in reversed(rows)])
    ax.set_xlabel("seconds (block stages: worker-seconds / workers)")
    ax.set_title("Where the time went: upper bar split by stage, lower bar the measured wall time")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _step_colours(steps: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {step: cmap(i % 10) for i, step in enumerate(steps)}
