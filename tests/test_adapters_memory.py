"""An adapter term stays within ``--memory-limit``: the planner counts what its reads hold.

A read of an adapter's rows holds, whatever the block size, the wide factor in float32 and
float64 (for an embedding LoRA, whose update is ``(B A).T``, the whole of ``A``), and per
row the float64 product slab and the block's rows of the tall factor. The engine's block
planner must count them: here the fixed part is most of the budget, and a planner that
ignored it chose blocks that took the run well past the limit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from streamvec.engine.execute import RUNTIME_OVERHEAD, plan_blocks
from streamvec.memory import PeakSampler, anon_bytes
from streamvec.model.sources import open as sv_open
from tests.conftest import write_checkpoint

SLACK = 8 << 20  # allocator and thread noise (measured 0-8 MB in the other memory tests)
# name, shape of the weight, rank, budget for blocks (beyond the process and the runtime)
CASES = {
    "linear": ("layer", (1024, 4096), 512, 48 << 20),
    "embedding": ("embed_tokens", (32768, 64), 256, 104 << 20),
}


def _adapter(path: Path, module: str, shape: tuple[int, int], k: int, seed: int) -> Path:
    """A PEFT-layout adapter of one module (embedding LoRA for an ``embed_*`` module)."""
    rng = np.random.default_rng(seed)
    path.mkdir()
    rows, cols = shape
    key = f"base_model.model.{module}"
    if module.startswith("embed"):
        # lora_embedding_A is r x num_embeddings, lora_embedding_B dim x r: tau = (B A).T.
        tensors = {
            f"{key}.lora_embedding_A": rng.standard_normal((k, rows), dtype=np.float32),
            f"{key}.lora_embedding_B": 0.01 * rng.standard_normal((cols, k), dtype=np.float32),
        }
    else:
        tensors = {
            f"{key}.lora_A.weight": rng.standard_normal((k, cols), dtype=np.float32),
            f"{key}.lora_B.weight": 0.01 * rng.standard_normal((rows, k), dtype=np.float32),
        }
    safetensors.numpy.save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": k, "lora_alpha": k, "target_modules": [module]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def _reference(w: np.ndarray, lora: Path) -> np.ndarray:
    f = {
        k: v.astype(np.float64)
        for k, v in safetensors.numpy.load_file(str(lora / "adapter_model.safetensors")).items()
    }
    a = next(v for k, v in f.items() if "_A" in k)
    b = next(v for k, v in f.items() if "_B" in k)
    tau = b @ a
    if tau.shape != w.shape:
        tau = tau.T
    return w.astype(np.float64) + tau.astype(np.float32)


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_run_stays_within_the_memory_limit(tmp_path: Path, case: str) -> None:
    module, shape, k, budget = CASES[case]
    # Warm up on a tiny pair: the first run of a process starts thread pools and imports (not
    # measured); a warm-up of the real size would leave its blocks in the allocator's heap.
    tiny = write_checkpoint(tmp_path / "tiny", {f"{module}.weight": np.ones((8, 16), np.float32)})
    tiny_lora = _adapter(tmp_path / "tiny-lora", module, (8, 16), 2, 1)
    (sv_open(tiny) + sv_open(tiny_lora, base=tiny)).save(tmp_path / "warm", progress=False)
    w = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    base = write_checkpoint(tmp_path / "base", {f"{module}.weight": w})
    lora = _adapter(tmp_path / "lora", module, shape, k, 2)
    model = sv_open(base) + sv_open(lora, base=base)
    before = anon_bytes()
    limit = before + RUNTIME_OVERHEAD + budget
    (planned,) = plan_blocks([model.resolved().tensors[f"{module}.weight"]], limit, 1, before)
    out = tmp_path / "out"
    with PeakSampler() as sampler:
        model.save(out, progress=False, workers=1, memory_limit=limit)
    growth = sampler.peak - before
    print(f"{case}: growth {growth / 2**20:.1f} MiB, blocks of {planned.block_rows} rows")
    assert growth <= budget + SLACK, (case, growth / 2**20, planned.block_rows)
    got = safetensors.numpy.load_file(str(next(out.glob("*.safetensors"))))
    np.testing.assert_allclose(got[f"{module}.weight"], _reference(w, lora), rtol=3e-7, atol=1e-6)
