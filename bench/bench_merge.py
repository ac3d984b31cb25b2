"""streamvec ``merge`` against mergekit 0.1.5 on the same recipes: outputs compared, timed.

Builds (or reuses) a synthetic bf16 Llama-shaped base and three fine-tunes of it
(:mod:`streamvec.tools.synth`), writes one recipe per mergekit task-vector method (plus one with
per-tensor filters and a layer gradient), and runs each through

* ``mergekit-yaml RECIPE OUT --no-copy-tokenizer --random-seed S``, and
* ``streamvec merge RECIPE -o OUT`` (in-process),

with ``dtype: float32`` (mergekit computes in float32, as streamvec always does) and
``out_dtype`` bfloat16 or float32 (``--out-dtype``). Then, tensor by tensor:

* deterministic methods (task_arithmetic, ties, breadcrumbs, breadcrumbs_ties): the ulp
  distance between the two outputs (bf16 or f32), elements more than 1 ulp apart, identical
  elements. Differences come from float32 (mergekit) vs float64 (streamvec) arithmetic, and for
  top-k selections from ties in magnitude at the threshold, which mergekit's unstable sort and
  streamvec's position rule break differently;
* randomised methods (dare_*, della*): the draws differ by construction, so their statistics
  are compared: the fraction of elements the merge changed, and the L1 and L2 norms of the
  merged task vector ``out - base``, as streamvec/mergekit ratios per tensor.

    PYTHONPATH=. python bench/bench_merge.py --mergekit /tmp/mk-venv/bin/mergekit-yaml \\
        [--workdir DIR] [--out-dtype bfloat16|float32] [--methods ties,dare_ties] [--json F]

mergekit is optional: without ``--mergekit`` (or ``mergekit-yaml`` on PATH) only streamvec runs
and its timings are printed.

``--throughput`` instead times streamvec alone on a larger synthetic model (``--params``) under
a memory limit: wall seconds, input throughput and peak anonymous memory (``RssAnon +
RssShmem + VmSwap`` sampled every 10 ms, minus the process's own before the run) per method,
the first passes (ranks, thresholds, L1 norms) included::

    PYTHONPATH=. python bench/bench_merge.py --throughput --params 0.2B --memory-limit 2GB
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from streamvec.model.sources import open as sv_open  # noqa: E402
from streamvec.tools import synth  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
DETERMINISTIC = ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "ties_filters")
RANDOMISED = ("dare_ties", "dare_linear", "della", "della_linear")
WEIGHTS = (0.5, 0.3, 0.7)
PARAMS: dict[str, list[dict[str, Any]]] = {
    "task_arithmetic": [{"weight": w} for w in WEIGHTS],
    "ties": [{"weight": w, "density": d} for w, d in zip(WEIGHTS, (0.3, 0.5, 0.7), strict=True)],
    "breadcrumbs": [{"weight": w, "density": 0.5, "gamma": 0.05} for w in WEIGHTS],
    "breadcrumbs_ties": [{"weight": w, "density": 0.4, "gamma": 0.02} for w in WEIGHTS],
    "dare_ties": [{"weight": w, "density": 0.5} for w in WEIGHTS],
    "dare_linear": [{"weight": w, "density": 0.3} for w in WEIGHTS],
    "della": [{"weight": w, "density": 0.5, "epsilon": 0.1} for w in WEIGHTS],
    "della_linear": [{"weight": w, "density": 0.4, "epsilon": 0.2} for w in WEIGHTS],
}


def recipes(root: Path, out_dtype: str) -> dict[str, str]:
    """One recipe per method (YAML text), all over the same base and fine-tunes."""
    per_method = PARAMS
    out = {}
    for name, params in per_method.items():
        lines = [f"merge_method: {name}", f"base_model: {root / 'base'}", "models:"]
        for m, p in zip("abc", params, strict=True):
            lines.append(f"  - model: {root / m}")
            lines.append(f"    parameters: {json.dumps(p)}")
        lines += ["dtype: float32", f"out_dtype: {out_dtype}"]
        out[name] = "\n".join(lines) + "\n"
    out["ties_filters"] = f"""merge_method: ties
base_model: {root / "base"}
models:
  - model: {root / "a"}
    parameters:
      weight: [{{filter: self_attn, value: 0.8}}, {{filter: mlp, value: 0.2}}, {{value: 0.5}}]
      density: [0.2, 0.8]
  - model: {root / "b"}
    parameters:
      weight: 0.4
  - model: {root / "c"}
    parameters:
      weight: 0.6
parameters:
  density: 0.5
  normalize: false
  lambda: 1.3
dtype: float32
out_dtype: {out_dtype}
"""
    return out


def ulp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in units in the last place of b's dtype (bf16 or f32)."""
    mant = 7 if b.dtype == BF16 else 23
    w = b.astype(np.float64)
    g = a.astype(np.float64)
    tiny = float(ml_dtypes.finfo(BF16).smallest_subnormal if b.dtype == BF16 else 1.4e-45)
    unit = np.exp2(np.floor(np.log2(np.maximum(np.abs(w), tiny))) - mant)
    return np.abs(g - w) / np.maximum(unit, tiny)


def load(path: Path) -> dict[str, np.ndarray]:
    model = sv_open(path)
    return {name: t.compute() for name, t in model.items()}


def filters_params(tensor: str) -> list[dict[str, float]]:
    """The values the ``ties_filters`` recipe gives each model for one tensor."""
    w_a = 0.8 if "self_attn" in tensor else 0.2 if "mlp" in tensor else 0.5
    d_a = 0.8 if ".layers.1." in tensor else 0.2  # gradient [0.2, 0.8] over two layers
    return [
        {"weight": w_a, "density": d_a},
        {"weight": 0.4, "density": 0.5},
        {"weight": 0.6, "density": 0.5},
    ]


def cut_ranks(name: str, model: int, numel: int, tensor: str) -> list[int]:
    """Ascending ranks at which a method's selection of one model's task vector is cut."""
    if name == "ties_filters":
        p = filters_params(tensor)[model]
    else:
        p = PARAMS[name][model] if name in PARAMS else {}
    d = p.get("density", 1.0)
    if name in ("ties", "ties_filters"):
        return [numel - max(1, int(d * numel))]
    if name in ("breadcrumbs", "breadcrumbs_ties"):
        keep, top = int(d * numel), int(p["gamma"] * numel)
        bot = max(0, numel - keep - top)
        return [bot, bot + keep]
    return []


def compare(
    name: str,
    ours: Path,
    theirs: Path,
    base: dict[str, np.ndarray],
    fts: list[dict[str, np.ndarray]],
) -> dict[str, Any]:
    """Tensor-by-tensor comparison; differences beyond 1 ulp are classified by cause."""
    a, b = load(ours), load(theirs)
    common = [n for n in b if n in a]
    missing = sorted(set(b) - set(a))
    if name in DETERMINISTIC:
        total = over = same = 0
        causes = {"mergekit_f32_rounding": 0, "magnitude_tie_at_cut": 0, "sign_vote_near_zero": 0}
        unexplained = 0
        worst = 0.0
        for n in common:
            d = ulp(a[n], b[n])
            total += d.size
            over += int((d > 1).sum())
            same += int((d == 0).sum())
            worst = max(worst, float(d[np.isfinite(d)].max()) if d.size else 0.0)
            bad = d > 1
            if not bad.any():
                continue
            b64 = base[n].astype(np.float64)
            taus32 = [f[n].astype(np.float32) - base[n].astype(np.float32) for f in fts]
            # 1. mergekit rounds every delta, product and sum to float32: within a few float32
            # roundings of the operands' magnitude (many ulps where the result cancels).
            mag = np.abs(b64) + sum(np.abs(f[n].astype(np.float64)) for f in fts)
            diff = np.abs(a[n].astype(np.float64) - b[n].astype(np.float64))
            cancel = bad & (diff <= 8 * 2.0**-24 * mag)
            # 2. Elements whose magnitude equals the value at a selection cut that several
            # elements share: mergekit's unstable sort and streamvec's position rule keep
            # different ones.
            tied = np.zeros(bad.shape, bool)
            kept = []
            for i, t in enumerate(taus32):
                m = np.abs(t)
                srt = np.sort(m.ravel())
                ranks = cut_ranks(name, i, m.size, n)
                for r in ranks:
                    if 0 < r < m.size and (srt == srt[r]).sum() > 1:
                        tied |= m == srt[r]
                k = np.ones(m.shape, bool)
                if ranks and 0 < ranks[0] < m.size:
                    k &= m >= srt[ranks[0]]
                if len(ranks) > 1 and 0 < ranks[1] < m.size:
                    k &= m <= srt[ranks[1]]
                kept.append(k)
            # 3. TIES sign vote whose weighted sum is zero up to rounding (float32 vs float64).
            per = filters_params(n) if name == "ties_filters" else PARAMS.get(name, [{}] * 3)
            w = [p.get("weight", 1.0) for p in per]
            terms = [
                wi * np.where(k, t.astype(np.float64), 0.0)
                for wi, t, k in zip(w, taus32, kept, strict=False)
            ]
            near = np.abs(sum(terms)) <= 2.0**-20 * sum(np.abs(x) for x in terms)
            vote = near if "ties" in name else np.zeros(bad.shape, bool)
            causes["mergekit_f32_rounding"] += int(cancel.sum())
            causes["magnitude_tie_at_cut"] += int((bad & ~cancel & tied).sum())
            causes["sign_vote_near_zero"] += int((bad & ~cancel & ~tied & vote).sum())
            unexplained += int((bad & ~cancel & ~tied & ~vote).sum())
        return {
            "kind": "deterministic",
            "tensors": len(common),
            "elements": total,
            "identical": same,
            "over_1_ulp": over,
            "over_1_ulp_by_cause": causes,
            "over_1_ulp_unexplained": unexplained,
            "max_ulp": worst,
            "missing_in_streamvec": missing,
        }
    kept_a, kept_b, l1, l2 = [], [], [], []
    l1_tot = [0.0, 0.0]
    for n in common:
        if a[n].dtype.kind not in "fV" and a[n].dtype != BF16:
            continue
        base_n = base[n].astype(np.float64)
        da = a[n].astype(np.float64) - base_n
        db = b[n].astype(np.float64) - base_n
        if not np.abs(db).sum():
            continue
        kept_a.append(float((da != 0).mean()))
        kept_b.append(float((db != 0).mean()))
        l1.append(float(np.abs(da).sum() / np.abs(db).sum()))
        l1_tot[0] += float(np.abs(da).sum())
        l1_tot[1] += float(np.abs(db).sum())
        l2.append(float(np.linalg.norm(da) / np.linalg.norm(db)))
    return {
        "kind": "randomised",
        "tensors": len(l1),
        "changed_fraction_streamvec": float(np.mean(kept_a)),
        "changed_fraction_mergekit": float(np.mean(kept_b)),
        "l1_ratio_all_tensors": l1_tot[0] / l1_tot[1],
        "l1_ratio_mean": float(np.mean(l1)),
        "l1_ratio_range": [float(min(l1)), float(max(l1))],
        "l2_ratio_mean": float(np.mean(l2)),
        "l2_ratio_range": [float(min(l2)), float(max(l2))],
        "missing_in_streamvec": missing,
    }


THROUGHPUT = {
    "task_arithmetic": [{"weight": w} for w in WEIGHTS],
    "ties": [{"weight": w, "density": 0.3} for w in WEIGHTS],
    "dare_ties": [{"weight": w, "density": 0.3} for w in WEIGHTS],
    "breadcrumbs": [{"weight": w, "density": 0.5, "gamma": 0.01} for w in WEIGHTS],
    "della": [{"weight": w, "density": 0.4, "epsilon": 0.1} for w in WEIGHTS],
    "ties_paper": [{"weight": w, "density": 0.2} for w in WEIGHTS],
    "dare_paper": [{"weight": w, "density": 0.1} for w in WEIGHTS],
}


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Time streamvec merges of a synthetic model under a memory limit."""
    from streamvec.memory import PeakSampler, anon_bytes
    from streamvec.ops.merge import RunSettings, merge

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    root = work / f"models-{args.params}"
    if not (root / "c").exists():
        base = synth.build_checkpoint(root / "base", params=args.params, shard_size="1GB")
        for i, m in enumerate("abc"):
            only = "*.self_attn.*" if m == "c" else None
            synth.build_finetune(base, root / m, rank=8, seed=i + 1, only=only)
    (work / "out").mkdir(parents=True, exist_ok=True)
    wanted = args.methods.split(",") if args.methods else list(THROUGHPUT)
    results: dict[str, Any] = {}
    for name in wanted:
        lines = [f"merge_method: {name}", f"base_model: {root / 'base'}", "models:"]
        for m, p in zip("abc", THROUGHPUT[name], strict=True):
            lines += [f"  - model: {root / m}", f"    parameters: {json.dumps(p)}"]
        recipe = work / f"tp-{name}.yaml"
        recipe.write_text("\n".join(lines) + "\n")
        out = work / "out" / f"tp-{name}"
        shutil.rmtree(out, ignore_errors=True)
        for shard in sorted(root.glob("*/*.safetensors")):  # warm the page cache
            with shard.open("rb") as f:
                while f.read(1 << 24):
                    pass
        before = anon_bytes()
        settings = RunSettings(workers=args.workers, memory_limit=args.memory_limit)
        t0 = time.perf_counter()
        with PeakSampler() as peak:
            report = merge(recipe, out, seed=args.seed, settings=settings)
        secs = time.perf_counter() - t0
        read = report.run.input_bytes
        results[name] = {
            "seconds": round(secs, 2),
            "input_GB": round(read / 1e9, 3),
            "input_GB_per_s": round(read / secs / 1e9, 3),
            "peak_anon_MB": round(peak.peak / 1e6, 1),
            "peak_anon_MB_over_baseline": round((peak.peak - before) / 1e6, 1),
            "memory_limit": args.memory_limit,
            "workers": args.workers,
        }
        print(name, json.dumps(results[name]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit", help="path of mergekit-yaml (default: on PATH, else skip)")
    ap.add_argument("--workdir", type=Path, help="where to build models (default: a temp dir)")
    ap.add_argument("--out-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--methods", help="comma-separated subset")
    ap.add_argument("--hidden", type=int, default=128, help="synthetic model width")
    ap.add_argument(
        "--in-dtype", default="bfloat16", choices=["bfloat16", "float32"], help="input weights"
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--throughput", action="store_true", help="time streamvec alone (see above)")
    ap.add_argument("--params", default="0.2B", help="model size for --throughput")
    ap.add_argument("--memory-limit", default="2GB", help="memory limit for --throughput")
    ap.add_argument("--workers", type=int, default=2, help="workers for --throughput")
    args = ap.parse_args(argv)
    if args.throughput:
        res = throughput(args)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
        return 0

    from streamvec.ops.merge import RunSettings, merge

    mk = args.mergekit or shutil.which("mergekit-yaml")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    root = work / "models"
    if not (root / "c").exists():
        shape = synth.LlamaShape(
            hidden=args.hidden,
            intermediate=args.hidden * 11 // 4,
            layers=2,
            heads=4,
            kv_heads=2,
            vocab=4 * args.hidden,
        )
        base = synth.build_checkpoint(
            root / "base", shape=shape, shard_size="1MB", seed=0, dtype=args.in_dtype
        )
        for i, m in enumerate("abc"):
            only = "*.self_attn.*" if m == "c" else None
            synth.build_finetune(base, root / m, rank=4, seed=i + 1, only=only)
    base_t = load(root / "base")
    fts = [load(root / m) for m in "abc"]
    texts = recipes(root, args.out_dtype)
    wanted = args.methods.split(",") if args.methods else list(texts)
    results: dict[str, Any] = {}
    (work / "out").mkdir(parents=True, exist_ok=True)
    for name in wanted:
        recipe = work / f"{name}.yaml"
        recipe.write_text(texts[name])
        ours = work / "out" / f"sv-{name}"
        shutil.rmtree(ours, ignore_errors=True)
        t0 = time.perf_counter()
        merge(recipe, ours, seed=args.seed, settings=RunSettings(workers=2))
        entry: dict[str, Any] = {"streamvec_s": round(time.perf_counter() - t0, 2)}
        if mk:
            theirs = work / "out" / f"mk-{name}"
            shutil.rmtree(theirs, ignore_errors=True)
            cmd = [mk, str(recipe), str(theirs), "--no-copy-tokenizer", "--quiet"]
            cmd += ["--random-seed", str(args.seed)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            entry["mergekit_s"] = round(time.perf_counter() - t0, 2)
            if proc.returncode != 0:
                entry["mergekit_error"] = proc.stderr.strip().splitlines()[-1:]
            else:
                entry.update(compare(name, ours, theirs, base_t, fts))
        results[name] = entry
        print(name, json.dumps(entry), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    bad = [
        n
        for n, r in results.items()
        if r.get("kind") == "deterministic"
        and (r["over_1_ulp_unexplained"] or r["missing_in_streamvec"])
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
