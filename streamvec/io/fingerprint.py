"""A quick identity of input files, recorded in every output's provenance and job record."""

from __future__ import annotations

from pathlib import Path

import xxhash

__all__ = ["fingerprint_files"]


def fingerprint_files(paths: list[Path]) -> str:
    """A quick identity of input files: names, sizes and safetensors headers (not the data).

    Cheap enough for every run; ``streamvec verify`` recomputes full data checksums.
    """
    h = xxhash.xxh3_128()
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0".encode())
        with p.open("rb") as f:
            head = f.read(8)
            h.update(head)
            if len(head) == 8:
                h.update(f.read(min(int.from_bytes(head, "little"), 100_000_000)))
    return h.hexdigest()
