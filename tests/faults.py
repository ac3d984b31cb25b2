"""Helpers of the fault suite: every writing command, a fingerprint of its inputs, checks.

``writing_commands(fam, out)`` lists ``(id, argv)`` for every command that writes an output,
all reading the same tiny synthetic family (a base and two fine-tunes), so a fault can be
tried against each of them. ``snapshot(paths)`` hashes every file under the inputs; a case
compares it before and after the command.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from streamvec.ops.merge.registry import get_method

from .conftest import run_cli_subprocess

# Small enough that every command finishes in a second or two on tiny models.
RANK = ("--rank", "2")
RSVD = ("--method", "randomized")


def recipe(path: Path, method: str, fam: dict[str, Path], params: str = "") -> Path:
    """A mergekit-style recipe over the family's base and fine-tunes ``a`` and ``b``."""
    # mergekit's methods require a weight per model; the papers' own and the SVD merges take none
    if method == "ties":
        weights = "{weight: 0.5, density: 0.5}"
    elif get_method(method).mergekit:
        weights = "{weight: 0.5}"
    else:
        weights = "{}"
    path.write_text(
        f"merge_method: {method}\n"
        f"base_model: {fam['base']}\n"
        "models:\n"
        f"  - model: {fam['a']}\n"
        f"    parameters: {weights}\n"
        f"  - model: {fam['b']}\n"
        f"    parameters: {weights}\n"
        f"parameters: {{{params}}}\n"
    )
    return path


MERGE_METHODS = {
    "task_arithmetic": "",
    "ties": "",
    "tsv": "rank: 2",
    "iso_c": "rank: 2",
    "shared_unique": "rank: 2, threshold: 0.5",
}


COMMANDS = (
    "diff",
    "combine",
    "svd",
    "lora",
    "decompose",
    "merge-svd",
    *(f"merge-{m}" for m in MERGE_METHODS),
)


def writing_commands(fam: dict[str, Path], out: Path, scratch: Path) -> list[tuple[str, list]]:
    """``(id, argv)`` of every command that writes ``out`` from the family's models."""
    base, a, b = fam["base"], fam["a"], fam["b"]
    cmds: list[tuple[str, list]] = [
        ("diff", ["diff", base, a, "-o", out]),
        ("combine", ["combine", "--base", base, "-o", out, f"{a}:0.5", f"{b}:0.5"]),
        ("svd", ["svd", a, "--base", base, "-o", out, *RANK, *RSVD]),
        ("lora", ["lora", base, a, "-o", out, *RANK]),
        ("decompose", ["decompose", a, b, "--base", base, "-o", out, *RANK]),
        ("merge-svd", ["merge-svd", "tsv", a, b, "--base", base, "-o", out, *RANK]),
    ]
    for method, params in MERGE_METHODS.items():
        r = recipe(scratch / f"{method}.yaml", method, fam, params)
        cmds.append((f"merge-{method}", ["merge", r, "-o", out]))
    return cmds


def snapshot(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or directories), by path."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_refused(proc, *fragments: str) -> None:
    """Exit 2, one line on stderr naming what is wrong (each fragment in it)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("streamvec: error:"), proc.stderr
    for f in fragments:
        assert f in lines[0], (f, proc.stderr)


def run(*argv) -> object:
    return run_cli_subprocess(*argv, "-q")


def act_during_run(argv: list, out: Path, act, env: dict | None = None):
    """Run the CLI; once it has started writing ``out`` (a sibling ``.OUT...`` exists), call
    ``act(proc)``; return the finished process (stderr as text) and whether ``act`` ran while
    the command was still running."""
    import os
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "streamvec.cli", *map(str, argv)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, **(env or {})),
    )
    prefix = f".{out.name}."
    deadline = time.monotonic() + 120
    acted = False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(p.name.startswith(prefix) for p in out.parent.iterdir()):
                act(proc)
                acted = proc.poll() is None
                break
            time.sleep(0.002)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc.stderr_text = err
    return proc, acted


def hostile_recipes(d: Path, fam: dict[str, Path]) -> list[tuple[str, Path, str]]:
    """``(id, recipe path, message fragment)``: recipes that must be refused quickly."""
    import os

    d.mkdir(parents=True, exist_ok=True)
    head = f"merge_method: task_arithmetic\nbase_model: {fam['base']}\n"
    models = f"models:\n  - model: {fam['a']}\n    parameters: {{weight: 0.5}}\n"
    cases = []
    # "billion laughs": 10 ** 9 values once expanded, a few hundred bytes on disk
    bomb = d / "bomb.yaml"
    lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 10):
        refs = ", ".join([f"*l{i - 1}"] * 10)
        lines.append(f"l{i}: &l{i} [{refs}]")
    bomb.write_text(
        head
        + models
        + "parameters:\n  weight: 1\n  extra: {\n"
        + "".join(f"    {line.replace(': ', ': ', 1)},\n" for line in lines)
        + "  }\n"
    )
    cases.append(("alias-bomb", bomb, "through YAML aliases"))
    deep = d / "deep.yaml"
    deep.write_text(head + models + "parameters: " + "[" * 5000 + "]" * 5000 + "\n")
    cases.append(("deep-nesting", deep, "nested more than"))
    big = d / "big.yaml"
    with big.open("w") as f:
        f.write(head + models + "# " + "x" * (50 << 20) + "\n")
    cases.append(("50MB", big, "larger than"))
    cases.append(("dev-zero", Path("/dev/zero"), "not a regular file"))
    fifo = d / "fifo.yaml"
    os.mkfifo(fifo)
    cases.append(("fifo", fifo, "not a regular file"))
    for name, target in (("dev-zero-model", Path("/dev/zero")), ("fifo-model", d / "m.fifo")):
        if name == "fifo-model":
            os.mkfifo(target)
        r = d / f"{name}.yaml"
        r.write_text(head + f"models:\n  - model: {target}\n    parameters: {{weight: 0.5}}\n")
        cases.append((name, r, "not a regular file or directory"))
    return cases
