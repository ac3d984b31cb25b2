"""``streamvec diff`` against the machine's own I/O, at several model sizes, in one run.

For each size a synthetic bf16 base + fine-tune pair is built (or reused from ``--workdir``
when an earlier ``--keep`` run left it), then, side by side:

(a) ``cat`` of the input files to /dev/null, warm page cache, after one warm-up read: the read
    roofline;
(b) a plain write of as many bytes as the diff's store holds (os.write in 64 MiB pieces,
    timed with and without the closing fdatasync: the engine's outputs are made durable by
    ``os.sync()`` before they are renamed into place, so the fdatasync figure is the one to
    compare with);
(c) ``streamvec diff`` as a subprocess, its peak RssAnon+RssShmem+VmSwap (children included)
    sampled every 10 ms from /proc/PID/status.

Prints a table (size, input GB/s engine and cat, their ratio, output GB/s, peak anonymous
memory, memory limit) and writes the same fields as JSON. Multi-GB files are deleted after
each size unless ``--keep``.

    python bench/bench_diff.py [--sizes 0.3B,1B] [--workdir DIR] [--keep] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from streamvec.tools.benchmark import run_bench

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "bench_diff.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--sizes", default="0.3B,1B", help="comma-separated (default 0.3B,1B)")
    ap.add_argument(
        "--workdir",
        type=Path,
        help="checkpoints and outputs (default: a new temporary directory under /tmp)",
    )
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and outputs for reuse")
    ap.add_argument("--repeat", type=int, default=3, help="diff runs per size (median shown)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    ap.add_argument("--memory-limit", help="passed to streamvec diff (default: its own)")
    ap.add_argument("--workers", type=int, help="passed to streamvec diff (default: its own)")
    args = ap.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not sizes or args.repeat < 1:
        ap.error("need at least one size and --repeat >= 1")
    run_bench(
        sizes,
        workdir=args.workdir,
        json_path=args.json,
        steps=("diff",),
        repeat=args.repeat,
        memory_limit=args.memory_limit,
        workers=args.workers,
        keep=args.keep,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
