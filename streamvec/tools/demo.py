"""``streamvec demo``: synthetic checkpoints through the whole engine, with a summary.

Builds a Llama-shaped base and three fine-tunes ("math", "code", and an attention-only "tox"),
computes their task vectors, builds an edited model ``base + 0.5 (math + code) - 0.5 tox``
directly from the checkpoints in one pass, checks a tensor against an in-memory float64
reference, verifies every output's checksums, and reports throughput and peak anonymous memory.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from streamvec.memory import PeakSampler
from streamvec.ops.combine import TermSpec, combine_terms
from streamvec.ops.task_vector import task_vector
from streamvec.tools import synth
from streamvec.tools.verify import verify
from streamvec.units import format_bytes


def run_demo(workdir: Path | None = None, *, params: str = "0.1B", progress: bool = True) -> None:
    """Run the demo in ``workdir`` (default: a temporary directory removed afterwards)."""
    tmp = None
    if workdir is None:
        tmp = Path(tempfile.mkdtemp(prefix="streamvec-demo-"))
        workdir = tmp
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        _demo(workdir, params, progress)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _demo(work: Path, params: str, progress: bool) -> None:
    print(f"streamvec demo in {work}")
    t0 = time.perf_counter()
    base = synth.build_checkpoint(work / "base", params=params, shard_size="100MB", seed=0)
    fts = {
        "math": synth.build_finetune(base, work / "math", rank=8, seed=1),
        "code": synth.build_finetune(base, work / "code", rank=8, seed=2),
        "tox": synth.build_finetune(base, work / "tox", rank=4, seed=3, only="*.self_attn.*"),
    }
    took = time.perf_counter() - t0
    print(f"1. built a {params}-parameter bf16 base and 3 fine-tunes in {took:.1f} s")

    runs = []
    with PeakSampler() as peak:
        for name, ft in fts.items():
            report = task_vector(base, ft).save(
                work / f"{name}.zarr", description="diff", progress=progress
            )
            runs.append(report)
            print(f"2. diff {name}: {report.summary()}")
        terms = [
            TermSpec(str(fts["math"]), 0.5),
            TermSpec(str(fts["code"]), 0.5),
            TermSpec(str(work / "tox.zarr"), -0.5),
        ]
        edited = combine_terms(terms, base=base)
        report = edited.save(work / "edited", description="combine", progress=progress)
        runs.append(report)
        print(f"3. combine base + 0.5 math + 0.5 code - 0.5 tox: {report.summary()}")

    name = "model.layers.0.self_attn.q_proj.weight"
    got = _load(work / "edited", name)
    want = _reference(base, fts, work, name)
    ok = np.array_equal(got, want)
    print(f"4. {name} equals the float64 in-memory reference rounded to bf16: {ok}")
    for out in [work / f"{n}.zarr" for n in fts] + [work / "edited"]:
        verify(out)
    print(f"5. verified the checksums of all {len(runs)} outputs")
    read = sum(r.input_bytes for r in runs)
    secs = sum(r.seconds for r in runs)
    print(
        f"summary: {format_bytes(read)} streamed in {secs:.1f} s "
        f"({format_bytes(read / secs)}/s); peak anonymous memory {format_bytes(peak.peak)}"
    )
    if not ok:
        raise SystemExit("demo: the edited tensor does not match the reference")


def _load(path: Path, name: str) -> np.ndarray:
    import json

    from safetensors import safe_open

    index = json.loads((path / "model.safetensors.index.json").read_text())
    with safe_open(path / index["weight_map"][name], framework="numpy") as f:
        return f.get_tensor(name)


def _reference(base: Path, fts: dict[str, Path], work: Path, name: str) -> np.ndarray:
    b = _load(base, name).astype(np.float64)
    m = _load(fts["math"], name).astype(np.float64)
    c = _load(fts["code"], name).astype(np.float64)
    t = _load(fts["tox"], name).astype(np.float64)
    ref = b + 0.5 * (m - b) + 0.5 * (c - b) - 0.5 * (t - b)
    return ref.astype(_load(base, name).dtype)
