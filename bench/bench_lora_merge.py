"""Many LoRA adapters into one: ``streamvec lora`` next to PEFT's ``add_weighted_adapter``.

Builds (or reuses) a synthetic bf16 Llama-shaped base (``streamvec synth``) and N random
rank-R PEFT LoRA adapters of it (q, k, v, o, gate, up and down projections of every layer,
``adapter_config.json`` + ``adapter_model.safetensors``): written in PEFT's file layout with
numpy, or with ``--peft-adapters`` made by PEFT itself (``get_peft_model`` on the base loaded
in bf16, ``init_lora_weights=False``, ``save_pretrained``). Then merges them with weights 1/N
into one rank-K adapter with

* ``streamvec lora --base BASE -o OUT a0:w ... --rank K`` (the factored path: QR of the
  stacked factors and an SVD of the small core per module, out of core), and
* PEFT: ``PeftModel.from_pretrained`` + ``load_adapter`` for each adapter on the base loaded
  with transformers, ``add_weighted_adapter(..., combination_type="svd", svd_rank=K)``, and
  ``save_pretrained`` of the merged adapter (PEFT forms each module's dense weighted update and
  runs a full SVD of it, with the whole model in memory),

as subprocesses, alternating the order across rounds. Each run gets its wall time and its peak
anonymous memory (``RssAnon + RssShmem + VmSwap`` of the process and its children, sampled
every 10 ms: file pages of memory maps are page cache and do not count). The inputs are read
once before every run so each tool starts with them in the page cache. The two adapters are
then compared: the relative Frobenius difference of their updates ``scaling * B @ A``, module
by module (at K >= N * R both are the exact weighted sum). The 1-minute load average is
printed before and after every run: the figures mean little on a busy machine.

    PYTHONPATH=. python bench/bench_lora_merge.py [--params 0.1B] [--adapters 4] [--rank 16]
        [--merged-rank 64] [--rounds 2] [--workdir DIR] [--peft-adapters]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python bench/bench_lora_merge.py` from anywhere
    sys.path.insert(0, str(REPO))

from streamvec.memory import PeakSampler  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PEFT_SCRIPT = """
import sys, torch, transformers, peft
base, out, rank, *adapters = sys.argv[1:]
model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
names = [f"a{i}" for i in range(len(adapters))]
pm = peft.PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
for name, path in zip(names[1:], adapters[1:]):
    pm.load_adapter(path, adapter_name=name)
pm.add_weighted_adapter(names, [1.0 / len(names)] * len(names), "merged",
                        combination_type="svd", svd_rank=int(rank))
pm.save_pretrained(out, selected_adapters=["merged"])
"""

# Adapters made by PEFT: each a fresh LoRA of every target on the base, saved, then removed.
PEFT_MAKE_SCRIPT = """
import sys, torch, transformers, peft
base, rank, targets, *outs = sys.argv[1:]
model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
for i, out in enumerate(outs):
    torch.manual_seed(100 + i)
    cfg = peft.LoraConfig(r=int(rank), lora_alpha=int(rank), init_lora_weights=False,
                          target_modules=targets.split(","))
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(out)
    model = pm.unload()
"""


def ensure_base(workdir: Path, params: str) -> Path:
    """The synthetic base checkpoint (built once per ``params``)."""
    base = workdir / f"base-{params}"
    if not (base / "config.json").exists():
        cmd = [sys.executable, "-m", "streamvec.cli", "synth", str(base), "--params", params]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return base


def make_adapters(base: Path, workdir: Path, count: int, rank: int) -> list[Path]:
    """``count`` random rank-``rank`` LoRA adapters of ``base`` in PEFT's file layout."""
    from safetensors.numpy import save_file

    from streamvec.io.safetensors.checkpoint import resolve_checkpoint

    shapes = {n: t.shape for n, t in resolve_checkpoint(base).tensors.items()}
    modules = sorted(
        n[: -len(".weight")]
        for n in shapes
        if n.endswith(".weight") and n.rsplit(".", 2)[-2] in TARGETS
    )
    paths = []
    for i in range(count):
        path = workdir / f"lora-{i}-r{rank}"
        paths.append(path)
        if (path / "adapter_model.safetensors").exists():
            continue
        path.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(100 + i)
        tensors = {}
        for m in modules:
            out_f, in_f = shapes[f"{m}.weight"]
            a = rng.normal(0, 1 / math.sqrt(in_f), (rank, in_f)).astype(np.float32)
            b = rng.normal(0, 0.01, (out_f, rank)).astype(np.float32)
            tensors[f"base_model.model.{m}.lora_A.weight"] = a
            tensors[f"base_model.model.{m}.lora_B.weight"] = b
        save_file(tensors, str(path / "adapter_model.safetensors"), {"format": "pt"})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(base),
            "r": rank,
            "lora_alpha": rank,
            "target_modules": list(TARGETS),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
        }
        (path / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return paths


def make_peft_adapters(base: Path, workdir: Path, count: int, rank: int) -> list[Path]:
    """``count`` random rank-``rank`` LoRA adapters of ``base`` saved by PEFT itself."""
    paths = [workdir / f"peft-lora-{i}-r{rank}" for i in range(count)]
    todo = [p for p in paths if not (p / "adapter_model.safetensors").exists()]
    if todo:
        cmd = [sys.executable, "-c", PEFT_MAKE_SCRIPT, str(base), str(rank), ",".join(TARGETS)]
        subprocess.run([*cmd, *map(str, todo)], check=True)
    return paths


def warm(paths: list[Path]) -> None:
    """Read every input file once so each run starts from the page cache."""
    for p in paths:
        for f in sorted(p.rglob("*")):
            if f.is_file():
                with f.open("rb") as fh:
                    while fh.read(16 << 20):
                        pass


def run_once(cmd: list[str], inputs: list[Path]) -> tuple[float, int]:
    """Wall seconds and peak anonymous bytes of one subprocess."""
    warm(inputs)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with PeakSampler(proc.pid, interval=0.01) as sampler:
        _, err = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{err.decode()[-2000:]}")
    return seconds, sampler.peak


def updates(adapter: Path) -> dict[str, np.ndarray]:
    """``scaling * B @ A`` per module of an adapter (float64)."""
    from safetensors.numpy import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    w = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key in w:
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        a = w[key].astype(np.float64)
        b = w[key.replace(".lora_A.", ".lora_B.")].astype(np.float64)
        r = a.shape[0]
        alpha = cfg.get("alpha_pattern", {}).get(module, cfg["lora_alpha"])
        out[module] = (alpha / r) * (b @ a)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--params", default="0.1B")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--merged-rank", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench-lora-merge"))
    p.add_argument(
        "--peft-adapters",
        action="store_true",
        help="make the adapters with PEFT (get_peft_model + save_pretrained on the base)",
    )
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = ensure_base(args.workdir, args.params)
    make = make_peft_adapters if args.peft_adapters else make_adapters
    adapters = make(base, args.workdir, args.adapters, args.rank)
    w = 1.0 / len(adapters)
    outs = {"streamvec": args.workdir / "merged-streamvec", "peft": args.workdir / "merged-peft"}
    cmds = {
        "streamvec": [
            sys.executable,
            "-m",
            "streamvec.cli.main",
            "lora",
            "--base",
            str(base),
            "-o",
            str(outs["streamvec"]),
            *(f"{a}:{w}" for a in adapters),
            "--rank",
            str(args.merged_rank),
            "--overwrite",
            "-q",
        ],
        "peft": [
            sys.executable,
            "-c",
            PEFT_SCRIPT,
            str(base),
            str(outs["peft"]),
            str(args.merged_rank),
            *map(str, adapters),
        ],
    }
    times: dict[str, list[float]] = {k: [] for k in cmds}
    peaks: dict[str, list[int]] = {k: [] for k in cmds}
    for rnd in range(args.rounds):
        order = list(cmds) if rnd % 2 == 0 else list(cmds)[::-1]
        for tool in order:
            before = os.getloadavg()[0]
            seconds, peak = run_once(cmds[tool], [base, *adapters])
            times[tool].append(seconds)
            peaks[tool].append(peak)
            print(
                f"round {rnd + 1} {tool}: {seconds:.1f} s, peak RssAnon {peak / 1e9:.2f} GB "
                f"(load average {before:.1f} before, {os.getloadavg()[0]:.1f} after)",
                flush=True,
            )
    mine = updates(outs["streamvec"])
    theirs = updates(outs["peft"] / "merged")
    rel = [
        float(np.linalg.norm(mine[m] - theirs[m]) / np.linalg.norm(theirs[m])) for m in sorted(mine)
    ]
    t = {k: statistics.median(v) for k, v in times.items()}
    m = {k: max(v) for k, v in peaks.items()}
    print(
        f"{args.adapters} rank-{args.rank} adapters of a {args.params} Llama-shaped model -> "
        f"rank {args.merged_rank}, median of {args.rounds} interleaved rounds: "
        f"streamvec {t['streamvec']:.1f} s / {m['streamvec'] / 1e9:.2f} GB, "
        f"PEFT add_weighted_adapter(svd) {t['peft']:.1f} s / {m['peft'] / 1e9:.2f} GB; "
        f"time ratio {t['streamvec'] / t['peft']:.3f}, memory ratio "
        f"{m['streamvec'] / m['peft']:.3f}; updates differ by at most "
        f"{max(rel):.2g} (relative Frobenius, {len(rel)} modules)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
