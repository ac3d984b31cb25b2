"""The same graphs on dask.distributed: identical results, memory limits, a worker dying."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from streamvec.tools import synth

from .conftest import run_cli
from .test_reliability import output_bytes

distributed = pytest.importorskip("distributed")

SHAPE = synth.LlamaShape(hidden=128, intermediate=352, layers=4, heads=2, kv_heads=1, vocab=2048)
PIN = ("--block-size", "16kB", "-q")  # the same block plan everywhere: comparable bytes


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    base = synth.build_checkpoint(root / "base", shape=SHAPE, shard_size="400kB", seed=0)
    return {
        "base": base,
        "a": synth.build_finetune(base, root / "a", rank=4, seed=1),
        "b": synth.build_finetune(base, root / "b", rank=4, seed=2),
    }


@pytest.fixture(scope="module")
def cluster():
    # Workers' memory limit (64 MB) is far below what a whole tensor pair would need in a
    # naive implementation; blocks of 16 kB keep each task tiny.
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        memory_limit="400MB",
        dashboard_address=None,
    ) as c:
        yield c


def jobs(fam: dict[str, Path], out: Path) -> dict[str, list[str]]:
    return {
        "diff": ["diff", str(fam["base"]), str(fam["a"]), "-o", str(out / "d.zarr")],
        "combine": [
            "combine",
            "--base",
            str(fam["base"]),
            "-o",
            str(out / "m"),
            f"{fam['a']}:0.5",
            f"{fam['b']}:-0.25",
        ],
        "combine-store": [
            "combine",
            "-o",
            str(out / "c.zarr"),
            f"{fam['a']}:1",
            "--base",
            str(fam["base"]),
        ],
    }


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One 256 MB bf16 tensor per checkpoint: the pair (512 MB) exceeds a worker's limit."""
    import numpy as np
    import safetensors.numpy

    from .conftest import BF16

    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16384, 8192), dtype=np.float32)
    paths = []
    for name, data in (("base", w), ("ft", w + np.float32(1e-3))):
        d = root / name
        d.mkdir()
        safetensors.numpy.save_file(
            {"embed.weight": data.astype(BF16)}, str(d / "model.safetensors")
        )
        paths.append(d)
    del w
    return paths[0], paths[1]


def test_worker_memory_limit_below_the_tensor_pair(big_pair, cluster, tmp_path: Path) -> None:
    base, ft = big_pair
    client = distributed.Client(cluster.scheduler_address)
    try:
        pids = sorted(client.run(os.getpid).values())
        out = tmp_path / "big.zarr"
        args = ["diff", base, ft, "-o", out, "-q", "--memory-limit", "380MB", "--workers", "1"]
        assert run_cli(*args, "--scheduler", cluster.scheduler_address) == 0
        # No worker was restarted by its nanny for exceeding its 400 MB limit.
        assert sorted(client.run(os.getpid).values()) == pids
    finally:
        client.close()
    assert run_cli("verify", out, "-q") == 0


@pytest.mark.parametrize("job", ["diff", "combine"])
def test_distributed_equals_threads(family, cluster, tmp_path: Path, job: str) -> None:
    local, remote, procs = tmp_path / "local", tmp_path / "remote", tmp_path / "procs"
    for d in (local, remote, procs):
        d.mkdir()
    assert run_cli(*jobs(family, local)[job], *PIN) == 0
    assert run_cli(*jobs(family, remote)[job], *PIN, "--scheduler", cluster.scheduler_address) == 0
    assert run_cli(*jobs(family, procs)[job], *PIN, "--scheduler", "processes") == 0
    assert output_bytes(local) == output_bytes(remote) == output_bytes(procs)


def test_local_cluster_spec(family, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert run_cli(*jobs(family, a)["diff"], *PIN) == 0
    assert run_cli(*jobs(family, b)["diff"], *PIN, "--scheduler", "local:2") == 0
    assert output_bytes(a) == output_bytes(b)


def test_a_worker_dying_mid_job(family, tmp_path: Path) -> None:
    ref, out = tmp_path / "ref", tmp_path / "out"
    ref.mkdir()
    out.mkdir()
    assert run_cli(*jobs(family, ref)["combine"], *PIN) == 0
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as c,
        distributed.Client(c) as client,
    ):
        result: dict[str, int] = {}
        args = [*jobs(family, out)["combine"], *PIN, "--scheduler", c.scheduler_address]
        t = threading.Thread(target=lambda: result.setdefault("rc", run_cli(*args)))
        t.start()
        # Wait until work is under way, then kill one worker process outright.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(client.processing().values()):
                break
            time.sleep(0.01)
        pid = next(iter(client.run(os.getpid).values()))
        assert t.is_alive(), "the job ended before a worker could be killed"
        os.kill(pid, signal.SIGKILL)
        t.join(timeout=300)
    assert result.get("rc") == 0
    assert output_bytes(out) == output_bytes(ref)
