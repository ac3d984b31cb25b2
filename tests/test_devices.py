"""``--device``: the torch/GPU path computes what the numpy path computes.

The weighted-sum kernel must agree bit for bit (same upcasts, same order, one rounding); the
SVD on the device must agree with the CPU algorithm to float64 rounding. Without a GPU the
same code runs through torch's CPU backend (``--device torch-cpu``); the ``cuda`` cases run
only where torch sees a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import zarr

from streamvec.compute.devices import check_device
from streamvec.compute.kernel import SLAB_ELEMENTS, combine_blocks
from streamvec.errors import StreamvecError
from streamvec.io.zarr.lowrank import LowRankReader, read_svd_store
from tests.conftest import BF16, run_cli

torch = pytest.importorskip("torch")

from streamvec.compute.linalg.rsvd import exact_svd, randomized_svd  # noqa: E402
from streamvec.compute.torch_kernel import TorchKernel  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU here")),
]
COEFFICIENTS = [
    (1.0, -1.0),  # a task vector
    (-1.0,),  # negation
    (2.5,),  # scaling
    (0.5, 0.5),  # the edited model base + 0.5 (ft - base), collapsed
    (1.0, 0.3, -0.7, 1.0),  # an analogy with weights
    (1.0, 1e-3),  # cancellation-prone
]


def operands(dtype: np.dtype, count: int, seed: int) -> list[np.ndarray]:
    """Blocks larger than one kernel slab, with signed zeros, subnormals, inf and nan."""
    rng = np.random.default_rng(seed)
    rows, cols = 97, SLAB_ELEMENTS // 97 + 301  # more than one slab, odd shapes
    out = []
    for i in range(count):
        x = rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-3, 3, (rows, cols))
        x = x.astype(np.float32)
        x[0, :6] = [0.0, -0.0, 1e-40, -1e-39, 3.0e38, -3.0e38]
        if i == 0:
            x[1, :3] = [np.inf, -np.inf, np.nan]
        out.append(x.astype(dtype))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_dtype", [BF16, np.dtype(np.float16), np.dtype(np.float32)])
@pytest.mark.parametrize(
    "out_dtype", [BF16, np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)]
)
@pytest.mark.parametrize("coefs", COEFFICIENTS)
@pytest.mark.parametrize("delta", [False, True])
def test_torch_kernel_is_bit_identical_to_numpy(device, in_dtype, out_dtype, coefs, delta) -> None:
    xs = operands(in_dtype, len(coefs), seed=len(coefs))
    terms = list(zip(coefs, xs, strict=True))
    # delta: every operand a checkpoint, evaluated relative to the first (the delta form)
    points = (True,) * len(coefs) if delta and len(coefs) > 1 else ()
    with np.errstate(over="ignore", invalid="ignore"):  # the inf/nan/huge entries, on purpose
        want = combine_blocks(terms, out_dtype, points)
        got = TorchKernel(device)(terms, out_dtype, points)
    assert got.dtype == want.dtype and got.shape == want.shape
    # Bit patterns: equal values, equal signed zeros; NaN payloads may differ, NaN-ness not.
    nan = np.isnan(want.astype(np.float64))
    assert np.array_equal(nan, np.isnan(got.astype(np.float64)))
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[want.dtype.itemsize]
    assert np.array_equal(got.view(bits)[~nan], want.view(bits)[~nan])


def test_torch_kernel_passes_non_float_tensors_through() -> None:
    ids = np.arange(24, dtype=np.int64).reshape(4, 6)
    got = TorchKernel("cpu")([(1.0, ids)], ids.dtype)
    assert got.dtype == np.int64 and np.array_equal(got, ids) and got is not ids


def test_check_device_names_and_errors() -> None:
    assert check_device(None) == "cpu" and check_device(" CPU ") == "cpu"
    assert check_device("torch-cpu") == "torch-cpu"
    with pytest.raises(StreamvecError, match="use cpu, cuda or cuda:N"):
        check_device("tpu")
    if not HAS_CUDA:
        with pytest.raises(StreamvecError, match="no CUDA GPU"):
            check_device("cuda")
    else:
        assert check_device("cuda") == "cuda"
        with pytest.raises(StreamvecError, match="CUDA device"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def gpu_or_torch_cpu() -> str:
    return "cuda" if HAS_CUDA else "torch-cpu"


def test_diff_and_combine_on_the_device_match_the_cpu_bit_for_bit(
    synth_family, tmp_path: Path
) -> None:
    device = gpu_or_torch_cpu()
    base, a, b = synth_family["base"], synth_family["a"], synth_family["b"]
    stores = {}
    for dev in ("cpu", device):
        out = tmp_path / f"tau-{dev}.zarr"
        assert run_cli("diff", base, a, "-o", out, "--device", dev, "-q") == 0
        stores[dev] = zarr.open_group(str(out), mode="r")
        edited = tmp_path / f"edited-{dev}"
        args = ("combine", "--base", base, f"{a}:0.7", f"{b}:-0.4", "--scale", "0.9")
        assert run_cli(*args, "-o", edited, "--device", dev, "--dtype", "bfloat16", "-q") == 0
    cpu, dev_store = stores["cpu"], stores[device]
    names = sorted(k for k, _ in cpu.arrays())
    assert names and names == sorted(k for k, _ in dev_store.arrays())
    for name in names:
        assert np.array_equal(cpu[name][...], dev_store[name][...]), name
    want = load_dir(tmp_path / "edited-cpu")
    got = load_dir(tmp_path / f"edited-{device}")
    assert want.keys() == got.keys()
    for name in want:
        assert np.array_equal(want[name].view(np.uint8), got[name].view(np.uint8)), name


def load_dir(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(safetensors.numpy.load_file(str(f)))
    return out


def test_report_names_the_device_and_every_stage(synth_family, tmp_path: Path) -> None:
    device = gpu_or_torch_cpu()
    report = tmp_path / "report.json"
    out = tmp_path / "tau.zarr"
    base, a = synth_family["base"], synth_family["a"]
    assert run_cli("diff", base, a, "-o", out, "--device", device, "--report", report, "-q") == 0
    data = json.loads(report.read_text())
    assert data["device"] == device
    stages = data["stage_seconds"]
    for stage in ("read", "compute", "encode", "write", "checksum", "blocks_wall", "finish_wall"):
        assert stages[stage] >= 0.0, stage
    assert stages["compute"] > 0 and stages["encode"] > 0  # lz4 chunks were encoded
    assert data["input_bytes"] > 0 and data["output_bytes"] > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["randomized", "exact"])
def test_device_svd_matches_the_cpu_algorithm(device: str, method: str) -> None:
    import dask.array as da

    from streamvec.compute.linalg.torch_svd import factor_on_device
    from streamvec.model.tensor import LazyTensor

    rng = np.random.default_rng(5)
    m, n, k = 300, 170, 12
    a = (rng.standard_normal((m, 20)) @ rng.standard_normal((20, n))).astype(np.float32)
    a += 0.05 * rng.standard_normal((m, n)).astype(np.float32)

    class Rows:  # a BlockReader over an in-memory matrix
        shape, dtype = a.shape, a.dtype

        def read(self, r0: int, r1: int) -> np.ndarray:
            return a[r0:r1]

    t = LazyTensor("w", a.shape, a.dtype, ((1.0, Rows()),))
    got = factor_on_device(
        t,
        k,
        method=method,
        oversample=10,
        power_iters=2,
        seed=9,
        block_rows=64,
        workers=2,
        device="torch-cpu" if device == "cpu" else device,
    )
    if method == "exact":
        want = exact_svd(a, k)
    else:
        want = randomized_svd(da.from_array(a, chunks=(64, n)), k, power_iters=2, seed=9)
    # exact: float64 on both sides; randomized: float32 products summed in another order
    rtol, atol = (1e-9, 2e-6) if method == "exact" else (1e-6, 1e-5)
    assert np.allclose(got.S, want.S, rtol=rtol)
    # Same sign convention, so the vectors agree entry by entry (float32 storage).
    assert np.allclose(got.U, want.U, atol=atol)
    assert np.allclose(got.Vh, want.Vh, atol=atol)
    assert abs(got.residual - want.residual) < 1e-6
    assert got.passes == 1


def test_svd_command_on_the_device_matches_the_cpu(synth_family, tmp_path: Path) -> None:
    device = gpu_or_torch_cpu()
    base, a = synth_family["base"], synth_family["a"]
    outs = {}
    for dev in ("cpu", device):
        outs[dev] = tmp_path / f"svd-{dev}.zarr"
        args = ("svd", a, "--base", base, "-o", outs[dev], "--rank", "4", "--device", dev, "-q")
        assert run_cli(*args) == 0
    cpu, gpu = read_svd_store(outs["cpu"]), read_svd_store(outs[device])
    assert cpu.entries.keys() == gpu.entries.keys()
    factored = [name for name, e in cpu.entries.items() if e.factored]
    assert factored
    for name in factored:
        e = cpu.entries[name]
        m = e.shape[0]
        u0, s0, v0 = LowRankReader(str(outs["cpu"]), e.path, e.shape, e.rank).factors(0, m)
        g = gpu.entries[name]
        u1, s1, v1 = LowRankReader(str(outs[device]), g.path, g.shape, g.rank).factors(0, m)
        assert np.allclose(s1, s0, rtol=1e-6), name
        assert np.allclose((u1 * s1) @ v1, (u0 * s0) @ v0, atol=1e-6), name


def test_cuda_without_a_gpu_is_one_line_and_exit_2(synth_family, tmp_path: Path) -> None:
    if HAS_CUDA:
        pytest.skip("this machine has a GPU")
    out = tmp_path / "tau.zarr"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamvec.cli.main",
            "diff",
            str(synth_family["base"]),
            str(synth_family["a"]),
            "-o",
            str(out),
            "--device",
            "cuda",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cuda" in lines[0] and "no CUDA GPU" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".tau.zarr*"))


def test_cpu_path_does_not_import_torch(synth_family, tmp_path: Path) -> None:
    code = (
        "import sys; from streamvec.cli.main import main; "
        f"rc = main(['diff', {str(synth_family['base'])!r}, {str(synth_family['a'])!r}, "
        f"'-o', {str(tmp_path / 't.zarr')!r}, '-q']); "
        "assert rc == 0; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_bench_gpu_script_dry_run(tmp_path: Path) -> None:
    """bench/bench_gpu.py runs end to end (torch on the CPU here) and finds equal outputs."""
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"
    out = tmp_path / "gpu.json"
    device = "cuda" if HAS_CUDA else "torch-cpu"
    args = ["--params", "2M", "--repeat", "1", "--rank", "4", "--device", device]
    proc = subprocess.run(
        [sys.executable, str(script), *args, "--workdir", str(tmp_path), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["device"] == device
    for step in ("combine", "diff", "svd"):
        assert data["results"][step]["same_result"] is True, step
        assert data["results"][step][device]["seconds"] > 0
