"""Synthetic Llama-shaped checkpoints and fine-tunes of them, for tests, demos and benchmarks.

:func:`build_checkpoint` writes a Hugging Face style sharded checkpoint
(``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` + ``config.json``)
with the real ``safetensors`` library; :func:`build_finetune` derives a "fine-tuned" copy whose
difference from the base is low-rank plus small noise, the structure real task vectors have.

Both are memory-bounded: at most one output shard is held at a time, tensors are generated one
by one, and random numbers are produced in fixed-size chunks on a thread pool (numpy's
generators release the GIL). Every chunk draws from its own generator, keyed by
``(seed, purpose, chunk, tensor name)``, so values depend neither on the number of threads nor
on the order tensors are generated in nor on how they are split into shards: the same arguments
always give byte-identical files.

Example::

    from streamvec.tools.synth import build_checkpoint, build_finetune

    base = build_checkpoint("/tmp/base", params="10M", shard_size="16MB")
    ft = build_finetune(base, "/tmp/ft", rank=8, only="*self_attn*")
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import safetensors
from safetensors.numpy import save_file

from streamvec.dtypes import dtype_name as _dtype_name
from streamvec.dtypes import is_float, parse_output_dtype
from streamvec.errors import CheckpointError, InputNotFoundError, OutputError, StreamvecError
from streamvec.io.output import refuse_overlap
from streamvec.io.safetensors.checkpoint import INDEX_NAME
from streamvec.io.safetensors.layout import TensorSpec, plan_shards, shard_file_names
from streamvec.units import parse_param_count, parse_size

SINGLE_NAME = "model.safetensors"
INT_BUFFER_NAME = "model.position_ids_buffer"
_SHARD_METADATA = {"format": "pt"}

# Elements per random-number chunk: 4 MiB of float32 scratch per worker thread, large enough
# that per-chunk generator setup is noise, small enough to stay cache- and memory-friendly.
# Changing it changes the generated values (chunks are the unit of seeding).
_CHUNK = 1 << 20

# Purposes mixed into generator keys so no two random streams ever coincide.
_BASE, _LOWRANK, _NOISE = 0, 1, 2

_MATRIX_STD = 0.02  # the usual Llama initializer_range
_NORM_STD = 0.02  # layernorm weights are 1 + this much noise


@dataclass(frozen=True)
class LlamaShape:
    """The sizes that determine every tensor shape of a Llama decoder.

    Example::

        >>> s = LlamaShape(hidden=64, intermediate=176, layers=2, heads=2, kv_heads=1, vocab=256)
        >>> s.tensor_shapes()["model.layers.0.self_attn.k_proj.weight"]
        (32, 64)
    """

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for field in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StreamvecError(f"LlamaShape.{field} must be a positive int, got {value!r}")
        if self.hidden % self.heads:
            raise StreamvecError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            raise StreamvecError(f"heads {self.heads} is not divisible by kv_heads {self.kv_heads}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight's Hugging Face name and shape, in the order ``LlamaForCausalLM`` has them.

        Returns:
            ``{name: shape}``; matrices are ``(out_features, in_features)`` as in torch.
        """
        h, kv = self.hidden, self.kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes[p + "self_attn.q_proj.weight"] = (h, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, h)
            shapes[p + "mlp.gate_proj.weight"] = (self.intermediate, h)
            shapes[p + "mlp.up_proj.weight"] = (self.intermediate, h)
            shapes[p + "mlp.down_proj.weight"] = (h, self.intermediate)
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab, h)
        return shapes

    def param_count(self) -> int:
        """Total number of parameters (elements of all weights).

        Returns:
            The sum of the element counts of :meth:`tensor_shapes`.

        Example::

            >>> LlamaShape(64, 176, 2, 2, 1, 256).param_count()
            125248
        """
        # Closed form (equal to summing tensor_shapes()) so llama_shape_for can size 70B models
        # without listing hundreds of thousands of candidate tensors.
        h, kv = self.hidden, self.kv_heads * self.head_dim
        per_layer = 2 * h * h + 2 * kv * h + 3 * h * self.intermediate + 2 * h
        embeddings = self.vocab * h * (1 if self.tie_embeddings else 2)
        return embeddings + self.layers * per_layer + h

    def config(self, dtype_name: str) -> dict:
        """A ``config.json`` dict that ``transformers.LlamaConfig`` accepts.

        Args:
            dtype_name: the weights' dtype (``bfloat16``, ``float16``, ``float32``...).

        Returns:
            The config as a JSON-serialisable dict.

        Example::

            >>> LlamaShape(64, 176, 2, 2, 1, 256).config("bfloat16")["torch_dtype"]
            'bfloat16'
        """
        dtype = parse_output_dtype(dtype_name)
        assert dtype is not None  # parse_output_dtype maps only None to None
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "hidden_act": "silu",
            "max_position_embeddings": 2048,
            "initializer_range": _MATRIX_STD,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "use_cache": True,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": _dtype_name(dtype),
        }


def _vocab_for(params: int) -> int:
    # Real Llama vocabularies would swamp tiny models (32000 x 64 alone is 2M parameters).
    if params >= 500_000_000:
        return 32000
    return 8192 if params >= 20_000_000 else 4096


def _kv_heads_for(heads: int) -> int:
    # Small models use plain multi-head attention; larger ones grouped-query attention with at
    # most 8 key/value heads (as Llama 2 70B and Llama 3 do).
    if heads <= 8:
        return heads
    return max(d for d in range(1, 9) if heads % d == 0)


def _shape_with_hidden(hidden: int, params: int, vocab: int) -> LlamaShape | None:
    heads = hidden // 64
    intermediate = math.ceil(8 * hidden / 3 / 64) * 64  # Llama's 2/3 * 4h, rounded up to 64
    one = LlamaShape(hidden, intermediate, 1, heads, _kv_heads_for(heads), vocab)
    per_layer = replace(one, layers=2).param_count() - one.param_count()
    layers = round((params - (one.param_count() - per_layer)) / per_layer)
    return replace(one, layers=layers) if layers >= 1 else None


def llama_shape_for(params: int) -> LlamaShape:
    """A plausible Llama-like shape with about ``params`` parameters (within 15% for 1M..70B).

    The rule: head_dim is 64 (``heads = hidden / 64``), ``intermediate`` is ``8/3 * hidden``
    rounded up to a multiple of 64, ``kv_heads = heads`` up to 8 heads and otherwise the largest
    divisor of ``heads`` that is at most 8 (grouped-query attention; 8 from hidden 1024 on),
    embeddings are untied, and the vocabulary is 32000 from 0.5B, 8192 from 20M and 4096 below.
    Candidate widths are multiples of 64 below 512, of 128 below 1024 and of 512 up to 16384;
    each gets the layer count that best fits ``params``, and among those within 5% of
    ``params`` the one closest to Llama's aspect ratio ``layers ~ hidden / 128`` (4096 x 32)
    wins. Examples: 1M -> hidden 64 x 9 layers, 100M -> 1024 x 7, 0.3B -> 1536 x 11,
    1B -> 2048 x 20, 7B -> 4608 x 31, 70B -> 9728 x 72.

    Args:
        params: the wanted number of parameters, at least 1M.

    Returns:
        The shape.

    Raises:
        StreamvecError: ``params`` is below 1M (build a :class:`LlamaShape` by hand instead).

    Example::

        >>> llama_shape_for(1_000_000_000).hidden
        2048
    """
    if isinstance(params, bool) or not isinstance(params, int) or params < 1_000_000:
        raise StreamvecError(
            f"cannot size a Llama model for {params!r} parameters: need at least 1M "
            "(use LlamaShape(...) directly for smaller models)"
        )
    vocab = _vocab_for(params)
    # Coarser widths as models grow keep head counts round (multiples of 8 from hidden 1024,
    # so kv_heads is 8) the way real configs are; the layer count absorbs the difference.
    widths = [*range(64, 512, 64), *range(512, 1024, 128), *range(1024, 16384 + 1, 512)]
    candidates = [
        shape
        for hidden in widths
        if (shape := _shape_with_hidden(hidden, params, vocab)) is not None
    ]

    def error(shape: LlamaShape) -> float:
        return abs(shape.param_count() - params) / params

    def off_ratio(shape: LlamaShape) -> float:
        return abs(math.log(shape.layers / max(2.0, shape.hidden / 128)))

    close = [s for s in candidates if error(s) <= 0.05]
    best = min(close, key=off_ratio) if close else min(candidates, key=error)
    if error(best) > 0.15:  # not reached for 1M..70B; guards the extrapolation beyond
        raise StreamvecError(f"cannot size a Llama model for {params} parameters within 15%")
    return best


def _workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 16))


def _rng(seed: int, purpose: int, chunk: int, name: str) -> np.random.Generator:
    # The name's bytes go last in the key, after fixed-position ints, so keys of distinct
    # (purpose, chunk, name) can never collide; no hashing involved.
    key = (purpose, chunk, *name.encode())
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _run(pool: ThreadPoolExecutor, fn: Callable[[int], None], count: int) -> None:
    for _ in pool.map(fn, range(count)):  # drain to propagate worker exceptions
        pass


def _fill_normal(
    pool: ThreadPoolExecutor, out: np.ndarray, seed: int, name: str, mean: float, std: float
) -> None:
    """Fill ``out`` with ``mean + std * N(0, 1)`` drawn in float32, rounded once to its dtype."""
    flat = out.reshape(-1)

    def chunk(i: int) -> None:
        z = _rng(seed, _BASE, i, name).standard_normal(
            min(_CHUNK, flat.size - i * _CHUNK), dtype=np.float32
        )
        z *= np.float32(std)
        z += np.float32(mean)
        flat[i * _CHUNK : i * _CHUNK + z.size] = z

    _run(pool, chunk, -(-flat.size // _CHUNK))


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output {out_dir} exists and is not a directory")
    # Stale shards from an earlier build with another shard count would make the set ambiguous.
    if out_dir.is_dir() and any(out_dir.glob("*.safetensors")):
        raise OutputError(f"output directory {out_dir} already holds .safetensors files")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output directory {out_dir}: {exc}") from None


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def build_checkpoint(
    out_dir: str | os.PathLike,
    *,
    params: str | int | None = None,
    shape: LlamaShape | None = None,
    dtype: str = "bfloat16",
    shard_size: str | int = "1GB",
    seed: int = 0,
    int_buffer: bool = True,
) -> Path:
    """Write a random Llama checkpoint in Hugging Face sharded safetensors layout.

    Matrices are ``N(0, 0.02)``, layernorm weights ``1 + N(0, 0.02)``, drawn in float32 and
    rounded once to ``dtype``. The directory gets ``model-0000i-of-0000N.safetensors`` (sharded
    names and index even when N is 1), ``model.safetensors.index.json``, ``config.json``,
    ``generation_config.json`` and a placeholder ``tokenizer_config.json``.

    Args:
        out_dir: directory to write; created if missing, must not already hold .safetensors files.
        params: approximate parameter count (``"0.3B"``, ``"10M"``, int); see
            :func:`llama_shape_for`. Give exactly one of ``params`` and ``shape``.
        shape: the exact shape to build.
        dtype: ``bfloat16``, ``float16`` or ``float32`` (``float64`` works too).
        shard_size: most tensor bytes per shard (headers not counted, as in transformers'
            ``max_shard_size``); a tensor larger than this gets a shard of its own.
        seed: same seed and arguments give byte-identical files.
        int_buffer: also write ``model.position_ids_buffer``, int64 ``(1, 64)`` = arange. It is
            not a real Llama tensor; it is there so consumers' non-float handling is exercised.

    Returns:
        ``out_dir`` as a Path.

    Example::

        base = build_checkpoint("/tmp/base", params="10M", dtype="float16", shard_size="8MB")
        # -> /tmp/base/model-00001-of-00003.safetensors ... model-00003-of-00003.safetensors
    """
    if (params is None) == (shape is None):
        raise StreamvecError("give exactly one of params= and shape=")
    if shape is None:
        assert params is not None
        shape = llama_shape_for(parse_param_count(params))
    np_dtype = parse_output_dtype(dtype)
    assert np_dtype is not None
    limit = parse_size(shard_size)
    if limit < 1:
        raise StreamvecError(f"shard_size must be positive, got {shard_size!r}")
    out = Path(out_dir)
    _check_out_dir(out)

    specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {
        name: (dims, np_dtype) for name, dims in shape.tensor_shapes().items()
    }
    if int_buffer:
        specs[INT_BUFFER_NAME] = ((1, 64), np.dtype(np.int64))
    nbytes = {name: math.prod(dims) * dt.itemsize for name, (dims, dt) in specs.items()}
    tensor_specs = [TensorSpec(n, dt, dims) for n, (dims, dt) in specs.items()]
    plan = [[s.name for s in shard] for shard in plan_shards(tensor_specs, limit)]
    files = shard_file_names(len(plan))

    with ThreadPoolExecutor(_workers()) as pool:
        for file, names in zip(files, plan, strict=True):
            tensors: dict[str, np.ndarray] = {}
            for name in names:
                dims, dt = specs[name]
                if name == INT_BUFFER_NAME:
                    tensors[name] = np.arange(math.prod(dims), dtype=dt).reshape(dims)
                    continue
                arr = np.empty(dims, dtype=dt)
                mean, std = (1.0, _NORM_STD) if len(dims) == 1 else (0.0, _MATRIX_STD)
                _fill_normal(pool, arr, seed, name, mean, std)
                tensors[name] = arr
            save_file(tensors, out / file, metadata=_SHARD_METADATA)
            del tensors  # drop this shard before generating the next

    weight_map = {name: file for file, names in zip(files, plan, strict=True) for name in names}
    _write_json(
        out / INDEX_NAME,
        {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map},
    )
    _write_json(out / "config.json", shape.config(dtype))
    _write_json(
        out / "generation_config.json",
        {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2},
    )
    _write_json(
        out / "tokenizer_config.json",
        {
            "_comment": "placeholder written by streamvec.tools.synth; there is no real tokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "model_max_length": 2048,
        },
    )
    return out


def _shard_files(base: Path) -> list[tuple[str, list[str] | None]]:
    """The base's shard files, each with the tensor names the index assigns it (or None)."""
    index = base / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index: {exc}") from None
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        return sorted(by_file.items())
    if (base / SINGLE_NAME).is_file():
        return [(SINGLE_NAME, None)]
    raise CheckpointError(f"{base} has neither {INDEX_NAME} nor {SINGLE_NAME}")


def _finetune_tensor(
    pool: ThreadPoolExecutor,
    base: np.ndarray,
    name: str,
    seed: int,
    rank: int,
    delta_scale: float,
    noise_scale: float,
) -> np.ndarray:
    # float64 bases are worked in float64 so the result is not capped at float32 precision.
    work = np.float64 if base.dtype == np.float64 else np.float32
    out = np.empty_like(base)
    # Work on row blocks of a matrix (so each block's slice of U @ V is formed once, small) and
    # on flat blocks of anything else; each block has its own noise generator.
    matrix = base.ndim == 2
    rows = base.reshape(base.shape[0], -1) if matrix else base.reshape(-1, 1)
    out_rows = out.reshape(rows.shape)
    step = max(1, _CHUNK // max(1, rows.shape[1]))
    if matrix:
        uv = _rng(seed, _LOWRANK, 0, name)
        u = uv.standard_normal((rows.shape[0], rank), dtype=np.float32)
        v = uv.standard_normal((rank, rows.shape[1]), dtype=np.float32)
        u *= np.float32(delta_scale / math.sqrt(rank))  # U @ V / sqrt(rank) has unit variance

    def chunk(i: int) -> None:
        block = slice(i * step, (i + 1) * step)
        acc = rows[block].astype(work)
        if matrix:
            np.add(acc, u[block] @ v, out=acc)
        noise = _rng(seed, _NOISE, i, name).standard_normal(acc.shape, dtype=np.float32)
        noise *= np.float32(noise_scale)
        np.add(acc, noise, out=acc)
        out_rows[block] = acc  # the single rounding to the base dtype

    _run(pool, chunk, -(-rows.shape[0] // step))
    return out


def build_finetune(
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    rank: int = 8,
    delta_scale: float = 0.01,
    noise_scale: float = 0.001,
    seed: int = 1,
    only: str | None = None,
) -> Path:
    """Write a "fine-tune" of ``base_dir`` whose task vector is low-rank plus small noise.

    Each 2-D float tensor ``W`` (m x n) becomes
    ``W + delta_scale * (U @ V) / sqrt(rank) + noise_scale * Z`` with ``U`` (m x rank),
    ``V`` (rank x n) and ``Z`` standard normal, computed in float32 from the upcast base and
    rounded once to the base dtype. Other float tensors (norm weights) get the noise only;
    non-float tensors are copied unchanged. Shard files, names, dtypes and the index are the
    base's; ``*.json``, ``*.model`` and ``*.txt`` side files (config...) are copied. One shard is
    in memory at a time.

    Args:
        base_dir: a sharded checkpoint (``model.safetensors.index.json``) or a single
            ``model.safetensors``.
        out_dir: directory to write; created if missing, must not already hold .safetensors files.
        rank: rank of the low-rank part of each matrix delta.
        delta_scale: standard deviation of the low-rank part's entries.
        noise_scale: standard deviation of the dense noise.
        seed: same seed and base give byte-identical files.
        only: an :mod:`fnmatch` glob over tensor names; when given, only matching tensors change
            and all others are copied bit for bit (e.g. ``"*self_attn*"`` for attention-only).

    Returns:
        ``out_dir`` as a Path.

    Example::

        ft = build_finetune("/tmp/base", "/tmp/ft-attn", rank=4, only="*.self_attn.*")
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise StreamvecError(f"rank must be a positive int, got {rank!r}")
    for label, value in (("delta_scale", delta_scale), ("noise_scale", noise_scale)):
        if not math.isfinite(value) or value < 0:
            raise StreamvecError(f"{label} must be finite and non-negative, got {value!r}")
    base, out = Path(base_dir), Path(out_dir)
    if not base.is_dir():
        raise InputNotFoundError(f"base checkpoint directory {base} does not exist")
    refuse_overlap(out, [base])
    shards = _shard_files(base)
    _check_out_dir(out)

    with ThreadPoolExecutor(_workers()) as pool:
        for file, names in shards:
            tensors: dict[str, np.ndarray] = {}
            with safetensors.safe_open(base / file, framework="numpy") as f:
                present = set(f.keys())
                if names is not None and not present.issuperset(names):
                    missing = sorted(set(names) - present)[:3]
                    raise CheckpointError(f"{base / file} lacks tensors its index names: {missing}")
                for name in names if names is not None else sorted(present):
                    t = f.get_tensor(name)
                    if is_float(t.dtype) and (only is None or fnmatch.fnmatchcase(name, only)):
                        t = _finetune_tensor(pool, t, name, seed, rank, delta_scale, noise_scale)
                    tensors[name] = t
            save_file(tensors, out / file, metadata=_SHARD_METADATA)
            del tensors  # drop this shard before reading the next

    for side in sorted(base.iterdir()):
        if side.is_file() and side.suffix in {".json", ".model", ".txt"}:
            shutil.copyfile(side, out / side.name)
    return out
