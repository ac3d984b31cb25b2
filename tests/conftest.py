"""Shared fixtures: tiny synthetic checkpoints built once per session, never in the tree."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from streamvec.cli.main import main

BF16 = np.dtype(ml_dtypes.bfloat16)


def write_checkpoint(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A one-file checkpoint written by the real safetensors library."""
    path.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, str(path / "model.safetensors"))
    return path


def mixed_tensors(seed: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    """0-d, 1-d, 2-d and 4-d floats, a name with '/', and an int buffer."""
    rng = np.random.default_rng(seed)

    def f(*shape: int) -> np.ndarray:
        return np.asarray(rng.standard_normal(shape) * 0.02, dtype=np.float32).astype(dtype)

    return {
        "model.embed.weight": f(257, 48),
        "model/odd/name.weight": f(33, 7),
        "model.norm.weight": f(48),
        "model.scale": f(),
        "model.conv.weight": f(4, 3, 5, 6),
        "model.position_ids": np.arange(12, dtype=np.int64).reshape(2, 6),
    }


def finetune_of(base: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Realistic fine-tune: small updates relative to the weights; non-floats unchanged."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in base.items():
        if v.dtype.kind in "iub":
            out[k] = v.copy()
            continue
        w = v.astype(np.float32)
        delta = (rng.standard_normal(v.shape) * 0.002).astype(np.float32)
        out[k] = np.asarray(w + delta).astype(v.dtype)
    return out


@pytest.fixture(scope="session")
def pair_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[np.dtype], tuple[Path, Path, dict, dict]]:
    """(base_dir, ft_dir, base_tensors, ft_tensors) for a dtype, built once per dtype."""
    cache: dict[str, tuple[Path, Path, dict, dict]] = {}

    def make(dtype: np.dtype) -> tuple[Path, Path, dict, dict]:
        key = np.dtype(dtype).name if np.dtype(dtype) != BF16 else "bfloat16"
        if key not in cache:
            root = tmp_path_factory.mktemp(f"pair-{key}")
            b = mixed_tensors(0, np.dtype(dtype))
            f = finetune_of(b, 1)
            cache[key] = (
                write_checkpoint(root / "base", b),
                write_checkpoint(root / "ft", f),
                b,
                f,
            )
        return cache[key]

    return make


@pytest.fixture(scope="session")
def synth_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny sharded Llama-shaped bf16 base and three fine-tunes built by streamvec.tools.synth."""
    from streamvec.tools import synth

    root = tmp_path_factory.mktemp("synth")
    shape = synth.LlamaShape(hidden=64, intermediate=176, layers=2, heads=2, kv_heads=1, vocab=256)
    base = synth.build_checkpoint(root / "base", shape=shape, shard_size="60kB", seed=0)
    return {
        "base": base,
        "a": synth.build_finetune(base, root / "a", rank=4, seed=1),
        "b": synth.build_finetune(base, root / "b", rank=4, seed=2),
        "c": synth.build_finetune(base, root / "c", rank=4, seed=3, only="*.self_attn.*"),
    }


def run_cli(*args: str | Path) -> int:
    """Run the CLI in-process (fast); returns the exit code."""
    return main([str(a) for a in args])


def run_cli_subprocess(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a real process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "streamvec.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def modules_imported_by_cli(*args: str | Path, modules: tuple[str, ...]) -> tuple[int, list[str]]:
    """Run the CLI in a fresh interpreter: its exit code, and which of ``modules`` it imported
    (start-up cost: a command must not import what it does not use)."""
    code = (
        "import sys; from streamvec.cli.main import main; "
        f"rc = main({[str(a) for a in args]!r}); "
        f"print(rc, ','.join(sorted(m for m in {modules!r} if m in sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rc, _, names = done.stdout.strip().partition(" ")
    return int(rc), [n for n in names.split(",") if n]


def rounded_once(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float64 ``x`` rounded to nearest, ties to even, in ``dtype``: the reference the outputs
    are checked against, independent of the converters under test.

    numpy rounds float64 -> float16 once; for bfloat16 (which ml_dtypes before 0.7.0 rounds
    through float32, twice) the three bf16 values around ``x`` are compared by their exact
    float64 distance to it. Infinities and NaN convert as they are; finite values must lie
    within bfloat16's range.
    """
    x = np.asarray(x, np.float64)
    if np.dtype(dtype) != BF16:
        return x.astype(dtype)
    mag = np.abs(x)
    near = (mag.astype(np.float32).view(np.uint32) & 0xFFFF0000).astype(np.int64)
    cands = np.clip(near[..., None] + np.array([-0x10000, 0, 0x10000]), 0, 0x7F7F0000)
    values = cands.astype(np.uint32).view(np.float32).astype(np.float64)
    dist = np.abs(values - mag[..., None])  # exact: neighbours of x
    best = dist.min(axis=-1, keepdims=True)
    # the nearest; of two at the same distance (a tie), the even one
    score = np.where(dist == best, (cands >> 16) & 1, 2)
    pick = np.take_along_axis(cands, score.argmin(axis=-1)[..., None], axis=-1)[..., 0]
    bits = (pick >> 16).astype(np.uint16) | np.where(np.signbit(x), 0x8000, 0).astype(np.uint16)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(x), bits.view(BF16), x.astype(BF16))  # inf, NaN: exact


def ulp_distance(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Distance in units of the last place of ``want``'s dtype (bf16 included), as float64."""
    dt = want.dtype
    mant = {np.dtype(np.float16): 10, BF16: 7, np.dtype(np.float32): 23, np.dtype(np.float64): 52}[
        dt
    ]
    w = want.astype(np.float64)
    g = got.astype(np.float64)
    # ulp of w: 2^(exponent - mantissa bits), with the subnormal floor of the type.
    tiny = float(
        ml_dtypes.finfo(dt).smallest_subnormal if dt == BF16 else np.finfo(dt).smallest_subnormal
    )
    exp = np.floor(np.log2(np.maximum(np.abs(w), tiny)))
    ulp = np.maximum(np.exp2(exp - mant), tiny)
    return np.abs(g - w) / ulp


def assert_matches_float64(
    got: np.ndarray, exact: np.ndarray, magnitude: np.ndarray, nterms: int, name: str = ""
) -> None:
    """``got`` is within 1 ulp of ``exact`` rounded to got's dtype, or, where the terms cancel
    below the output's resolution, within float32 accumulation error: ``nterms * 2^-24 *
    sum|c_i x_i|`` (``magnitude``). An exact float64 zero has no meaningful ulp scale."""
    want = rounded_once(exact, got.dtype)
    ok_ulp = ulp_distance(got, want) <= 1.0
    ok_cancel = np.abs(got.astype(np.float64) - exact) <= nterms * 2.0**-24 * magnitude
    bad = ~(ok_ulp | ok_cancel)
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} elements off, e.g. got {got[bad][:3]} want {want[bad][:3]}"
    )


def tiny_llama_config(**overrides: object) -> object:
    """A real ``transformers`` LlamaConfig small enough for tests (2 layers, hidden 32)."""
    import transformers

    settings: dict[str, object] = {
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    return transformers.LlamaConfig(**{**settings, **overrides})
