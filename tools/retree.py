"""Move streamvec's modules into the layered tree, and rewrite every reference to them.

The tree (``streamvec/`` below)::

    __init__.py errors.py dtypes.py units.py names.py memory.py   foundations every layer uses
    merge.py                    ``streamvec.merge``: the public merge API, a re-export
    io/                         bytes and offsets, no arithmetic
        blocks.py output.py writeback.py companions.py hub.py ...
        safetensors/            headers, checkpoints, the sharded writer, FP8, quantized
        zarr/                   the store layout, its validation, chunk reads, SVD stores
        peft/                   LoRA adapters: module naming, readers, writer
    model/                      lazy tensors, sources and the algebra on them
    compute/                    block kernels (numpy, torch), devices, finite checks, linalg/
    engine/                     running a lazy model: plan, schedule, jobs, sinks
    ops/                        one module per operation; merge/ (methods), stats/
    cli/                        the ``streamvec`` command and its sub-command parsers
    tools/                      synth, demo, info, verify, benchmark/

:data:`TABLE` maps every module of the flat layout (and the ones added alongside it) to its
place. Modules it does not know are left where they are and listed at the end, so that they
can be placed by hand (or added to the table and the script rerun on a clean checkout).

What it does, in order:

1. ``git mv`` every module to its new path (through a staging folder, so that a module can
   become a package of the same name: ``engine.py`` -> ``engine/execute.py``); new packages
   get an ``__init__.py`` with a docstring and no imports (importing a package must stay
   cheap); old packages left empty are removed;
2. writes the re-export ``streamvec/merge.py`` (``streamvec.merge.merge`` is public API) and
   ``streamvec/cli/__main__.py`` (``python -m streamvec.cli``);
3. rewrites every reference in streamvec/, tests/, bench/, examples/, docs/, README.md, run.sh,
   .ci/ and pyproject.toml: ``import streamvec.x``, ``from streamvec.x import y``,
   ``from streamvec import x`` (split per moved module, keeping the local name with ``as``),
   dotted strings (monkeypatch and ``mock.patch`` targets, entry points, ``:mod:`` roles) and
   paths (``streamvec/engine.py``). Kept as written: ``python -m streamvec.cli``, the public
   ``streamvec.merge`` in Markdown, and any line holding ``retree: keep``;
4. runs ``ruff check --select I --fix`` and ``ruff format`` (imports re-sorted after the
   rename) when ruff is found, and lists Python lines the rename made longer than 100
   characters (docstrings and comments ruff cannot wrap).

Usage::

    python tools/retree.py --check ROOT     # print the plan; change nothing
    python tools/retree.py ROOT [--ruff PATH] [--allow-dirty]

ROOT is a git checkout with a clean working tree (commit first: the move is one reviewable
diff, and ``git checkout .`` undoes it). Exit code 0 when done (or when the plan is clean with
``--check``), 1 when unknown modules were left in place, 2 on bad usage or a conflict.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import re
import shutil
import subprocess
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "streamvec"

# OLD -> NEW, relative to streamvec/. A path ending in "/" moves a whole package, files added to
# it later included; a file entry overrides its folder's entry. NEW == OLD: the module stays.
# Entries whose OLD does not exist are skipped (the tree they run on may lack them).
TABLE: dict[str, str] = {
    # Foundations every layer imports: stay at the root.
    "__init__.py": "__init__.py",
    "errors.py": "errors.py",
    "dtypes.py": "dtypes.py",
    "units.py": "units.py",
    "names.py": "names.py",
    "memory.py": "memory.py",
    "version.py": "version.py",
    "signals.py": "signals.py",
    # io: bytes and offsets.
    "io/__init__.py": "io/__init__.py",
    "io/blocks.py": "io/blocks.py",
    "io/read_buffers.py": "io/read_buffers.py",
    "io/output.py": "io/output.py",
    "io/writeback.py": "io/writeback.py",
    "io/companions.py": "io/companions.py",
    "hub.py": "io/hub.py",
    "io/header.py": "io/safetensors/header.py",
    "io/checkpoint.py": "io/safetensors/checkpoint.py",
    "io/st_writer.py": "io/safetensors/writer.py",
    "io/st_layout.py": "io/safetensors/layout.py",
    "io/fp8.py": "io/safetensors/fp8.py",
    "io/quantized.py": "io/safetensors/quantized.py",
    "requantize.py": "io/safetensors/requantize.py",
    "io/zarr_store.py": "io/zarr/store.py",
    "io/zarr_chunks.py": "io/zarr/chunks.py",
    "io/store_check.py": "io/zarr/access.py",
    "io/store_validate.py": "io/zarr/validate.py",
    "io/lowrank.py": "io/zarr/lowrank.py",
    "io/adapter_readers.py": "io/peft/readers.py",
    "adapters/naming.py": "io/peft/naming.py",
    "adapters/writer.py": "io/peft/writer.py",
    # model: lazy tensors and the algebra.
    "algebra.py": "model/algebra.py",
    "tensor.py": "model/tensor.py",
    "sources.py": "model/sources.py",
    "adapters/source.py": "model/peft_source.py",
    "ties.py": "model/ties.py",
    "vocab.py": "model/vocab.py",
    "nonfloat.py": "model/nonfloat.py",
    # compute: block arithmetic and decompositions.
    "kernel.py": "compute/kernel.py",
    "torch_kernel.py": "compute/torch_kernel.py",
    "devices.py": "compute/devices.py",
    "finite.py": "compute/finite.py",
    "linalg/": "compute/linalg/",
    # engine: plan, schedule, jobs, sinks.
    "engine.py": "engine/execute.py",
    "jobs.py": "engine/jobs.py",
    "sinks.py": "engine/sinks.py",
    "into_torch.py": "engine/into_torch.py",
    "settings.py": "engine/settings.py",
    # ops: one module per operation, merge methods and stats under it.
    "ops/": "ops/",
    "operations.py": "ops/registry.py",
    "merge/": "ops/merge/",
    "stats/": "ops/stats/",
    # cli: the command and its sub-command parsers.
    "cli.py": "cli/main.py",
    "ops/svd_cli.py": "cli/svd.py",
    "merge/cli.py": "cli/merge.py",
    "stats/cli.py": "cli/stats.py",
    "benchmark/cli.py": "cli/bench.py",
    # tools: around the engine, not in its path.
    "synth.py": "tools/synth.py",
    "demo.py": "tools/demo.py",
    "info.py": "tools/info.py",
    "verify.py": "tools/verify.py",
    "benchmark/": "tools/benchmark/",
}

# Entries that apply only when another module exists: the operation table of the settings
# work (operations.py) takes ops/registry.py's name, so the older paper list steps aside.
CONDITIONAL: dict[str, tuple[str, str]] = {
    "ops/registry.py": ("ops/papers.py", "operations.py"),
}

# Names that moved out of a module that stays: (module, name) -> the module that now defines
# it. `from streamvec import __version__` ran the package __init__ from inside the engine and
# the operations, which that __init__ imports (a cycle).
NAME_MOVES: dict[tuple[str, str], str] = {
    (PACKAGE, "__version__"): f"{PACKAGE}.version",
}

# Docstrings of the packages the move creates (no imports: importing a package stays cheap).
PACKAGE_DOCS: dict[str, str] = {
    "io/safetensors": "safetensors files: headers, checkpoints, the sharded writer, FP8 and "
    "quantized weights.",
    "io/zarr": "streamvec's Zarr stores: the layout, validation before reading, chunk reads, "
    "SVD stores.",
    "io/peft": "PEFT LoRA adapters: module naming, row-block readers of B @ A, the writer.",
    "model": "Lazy models: tensors as weighted sums of readers, sources, and the algebra.",
    "compute": "Block arithmetic: the kernels (numpy, torch), devices, finite checks, linalg.",
    "engine": "Running a lazy model under a memory budget: plan, schedule, jobs, sinks.",
    "cli": "The ``streamvec`` command line: thin argument parsing over the Python API.",
    "tools": "Tools around the engine: synthetic checkpoints, the demo, info, verify, bench.",
}

# Old modules that stay importable under their old name through a re-export module.
SHIMS: dict[str, str] = {"merge": "ops/merge"}

# Where references are rewritten (relative to ROOT).
REWRITE_DIRS = ("streamvec", "tests", "bench", "examples", "docs", ".ci")
REWRITE_FILES = ("README.md", "run.sh", "pyproject.toml")
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt", ".cfg", ".ini", ".yaml", ".yml", ""}

KEEP_MARK = "retree: keep"
LINE_LIMIT = 100


class RetreeError(Exception):
    """A plan that cannot be carried out (conflicting destinations, a dirty tree)."""


@dataclass
class Plan:
    """What the move does to one tree."""

    moves: dict[str, str] = field(default_factory=dict)  # old file -> new file (rel. to pkg)
    unknown: list[str] = field(default_factory=list)
    modules: dict[str, str] = field(default_factory=dict)  # old dotted -> new dotted
    packages: set[str] = field(default_factory=set)  # new package folders (rel. to pkg)
    emptied: list[str] = field(default_factory=list)  # old package __init__.py to remove
    shims: dict[str, str] = field(default_factory=dict)  # shim file -> package it re-exports
    shim_names: set[str] = field(default_factory=set)  # the names the shims re-export


def _dotted(rel: str) -> str:
    """``io/zarr/store.py`` -> ``streamvec.io.zarr.store``; a package's __init__ -> package."""
    parts = [PACKAGE, *Path(rel).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _destination(rel: str, present: set[str]) -> str | None:
    """Where one file (relative to the package) goes, or None when the table does not know it."""
    if rel in CONDITIONAL:
        new, when = CONDITIONAL[rel]
        if when in present:
            return new
    if rel in TABLE:
        return TABLE[rel]
    # The deepest folder entry that holds the file.
    parts = Path(rel).parts
    for depth in range(len(parts) - 1, 0, -1):
        folder = "/".join(parts[:depth]) + "/"
        if folder in TABLE:
            return TABLE[folder] + "/".join(parts[depth:])
    return None


def _exported(init: Path) -> list[str]:
    """The ``__all__`` of a module, read without importing it."""
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    return []


def make_plan(root: Path) -> Plan:
    """Work out every move for the tree at ``root`` without touching it.

    Args:
        root: the repository root.

    Returns:
        The plan.

    Raises:
        RetreeError: two files would land on one path, or the tree was already moved.
    """
    pkg = root / PACKAGE
    present = {
        p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py") if "__pycache__" not in p.parts
    }
    plan = Plan()
    for rel in sorted(present):
        new = _destination(rel, present)
        if new is None:
            if Path(rel).name == "__init__.py":
                continue  # a package's own __init__ follows its modules (below)
            plan.unknown.append(rel)
            continue
        plan.moves[rel] = new
    targets: dict[str, str] = {}
    for old, new in plan.moves.items():
        if new in targets:
            raise RetreeError(f"{old} and {targets[new]} would both move to {new}")
        if new in present and plan.moves.get(new, new) == new and new != old:
            raise RetreeError(f"{old} would move onto {new}, which stays where it is")
        targets[new] = old
    if not any(old != new for old, new in plan.moves.items()):
        raise RetreeError("nothing to move: the tree is already in its new layout")
    # Old package __init__ files whose folder keeps no module: removed (their folder goes).
    staying = {old for old, new in plan.moves.items() if old == new} | set(plan.unknown)
    for rel in sorted(present):
        if Path(rel).name != "__init__.py" or rel in plan.moves:
            continue
        folder = str(Path(rel).parent)
        if not any(s.startswith(folder + "/") and s != rel for s in staying):
            plan.emptied.append(rel)
    # Every folder on the way to a new file is a package.
    for new in targets:
        parent = Path(new).parent
        while str(parent) != ".":
            plan.packages.add(parent.as_posix())
            parent = parent.parent
    for old, new in plan.moves.items():
        plan.modules[_dotted(old)] = _dotted(new)
    # A removed package name that a shim keeps: `streamvec.merge` -> `streamvec.ops.merge`.
    for old_pkg, new_pkg in SHIMS.items():
        if f"{old_pkg}/__init__.py" in plan.moves:
            plan.shims[f"{old_pkg}.py"] = new_pkg
            plan.shim_names |= set(_exported(pkg / old_pkg / "__init__.py"))
    return plan


# ----------------------------------------------------------------------------- moving files


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(root), *args], check=True, capture_output=True, text=True
    )
    return done.stdout


def _move(root: Path, tracked: set[str], src: str, dst: str) -> None:
    (root / dst).parent.mkdir(parents=True, exist_ok=True)
    if src in tracked:
        _git(root, "mv", src, dst)
    else:
        os.rename(root / src, root / dst)


def apply_moves(root: Path, plan: Plan) -> None:
    """Move the files (through a staging folder), add new packages, remove emptied ones.

    Args:
        root: the repository root.
        plan: the plan from :func:`make_plan`.
    """
    tracked = set(_git(root, "ls-files", PACKAGE).split("\n"))
    staging = f"{PACKAGE}/_retree_staging"
    moving = {old: new for old, new in plan.moves.items() if old != new}
    staged: dict[str, str] = {}
    for number, old in enumerate(sorted(moving)):
        step = f"{staging}/{number}.py"
        _move(root, tracked, f"{PACKAGE}/{old}", step)
        staged[step] = f"{PACKAGE}/{moving[old]}"
    tracked = set(_git(root, "ls-files", PACKAGE).split("\n"))
    for step, dst in staged.items():
        _move(root, tracked, step, dst)
    shutil.rmtree(root / staging, ignore_errors=True)
    for rel in plan.emptied:
        path = root / PACKAGE / rel
        if path.exists():
            _git(root, "rm", "-q", f"{PACKAGE}/{rel}")
    for folder in sorted(plan.packages):
        init = root / PACKAGE / folder / "__init__.py"
        if not init.exists():
            doc = PACKAGE_DOCS.get(folder, f"The ``{_dotted(folder + '/x.py')[:-2]}`` package.")
            init.write_text(f'"""{doc}"""\n', encoding="utf-8")
            _git(root, "add", str(init.relative_to(root)))
    # Folders emptied by the move (nothing left but bytecode caches) go.
    for path in sorted((root / PACKAGE).rglob("*"), reverse=True):
        if path.is_dir() and path.name != "__pycache__":
            left = [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
            if not left:
                shutil.rmtree(path, ignore_errors=True)


def write_entry_points(root: Path, plan: Plan) -> None:
    """Write the re-export shims and ``cli/__main__.py``.

    Args:
        root: the repository root.
        plan: the plan.
    """
    for shim, target in plan.shims.items():
        names = _exported(root / PACKAGE / target / "__init__.py")
        module = _dotted(target + "/__init__.py")
        body = "".join(f"    {n},\n" for n in names)
        listing = "".join(f'    "{n}",\n' for n in names)
        text = (
            f'"""``{_dotted(shim)}``: the public name of :mod:`{module}`.\n\n'
            f"A re-export only: ``{_dotted(shim)}.merge`` is public API, the code lives in\n"
            f":mod:`{module}`.\n"
            '"""\n\n'
            f"from {module} import (\n{body})\n\n__all__ = [\n{listing}]\n"
        )
        path = root / PACKAGE / shim
        path.write_text(text, encoding="utf-8")
        _git(root, "add", str(path.relative_to(root)))
    cli_main = plan.modules.get(f"{PACKAGE}.cli")
    if cli_main and cli_main != f"{PACKAGE}.cli":
        path = root / PACKAGE / "cli" / "__main__.py"
        path.write_text(
            '"""``python -m streamvec.cli``: the same as the ``streamvec`` command."""\n\n'
            "import sys\n\n"
            f"from {cli_main} import main\n\n"
            "sys.exit(main())\n",
            encoding="utf-8",
        )
        _git(root, "add", str(path.relative_to(root)))


# ------------------------------------------------------------------------ rewriting references

_FROM = re.compile(
    r"^(?P<indent>[ \t]*)from[ \t]+(?P<module>" + PACKAGE + r"(?:\.\w+)*)[ \t]+import[ \t]+"
    r"(?P<names>\([^)]*\)|[^\n#]*?)(?P<tail>[ \t]*(?:#[^\n]*)?)$",
    re.MULTILINE,
)
_DOTTED = re.compile(r"(?<![\w.])" + PACKAGE + r"(?:\.[A-Za-z_]\w*)+")
_PATH = re.compile(r"(?<![\w/.])" + PACKAGE + r"(?:/[A-Za-z_]\w*)+(?:\.py|/)?")
# `python -m streamvec.cli` (in a shell line or an argv list) runs cli/__main__.py: kept.
_KEEP = re.compile(r"-m(?:[ \t]+|[\"'],[ \t]*[\"'])" + PACKAGE + r"\.cli\b(?!\.)")


class Rewriter:
    """Rewrites references to moved modules in one file's text."""

    def __init__(self, plan: Plan) -> None:
        self.modules = plan.modules
        self.moves = plan.moves
        self.shim_modules = {_dotted(s) for s in plan.shims}
        self.shim_names = plan.shim_names
        self.warnings: list[str] = []  # statements the rewrite could not split
        self.folders: dict[str, str] = {}
        for old, new in TABLE.items():
            if old.endswith("/") and new != old:
                self.folders[old.rstrip("/")] = new.rstrip("/")

    def _module(self, dotted: str) -> str:
        """The new spelling of a dotted name: the longest old-module prefix is replaced."""
        parts = dotted.split(".")
        for cut in range(len(parts), 1, -1):
            head = ".".join(parts[:cut])
            if head in self.modules:
                return ".".join([self.modules[head], *parts[cut:]])
        return dotted

    def _from_import(self, match: re.Match[str]) -> str:
        indent, module, names = match["indent"], match["module"], match["names"]
        tail = match["tail"]
        inner = names.strip()
        if inner.startswith("("):
            inner = inner[1:-1]
        # Comments inside a parenthesised list would be lost: leave such a statement alone.
        if "#" in inner:
            if any(
                f"{module}.{a.split()[0]}" in self.modules for a in inner.split(",") if a.split()
            ):
                self.warnings.append(f"comments inside `from {module} import (...)`: check it")
            return match[0].replace(module, self._module(module), 1)
        aliases = [a.strip() for a in inner.replace("\n", " ").split(",") if a.strip()]
        kept: list[str] = []
        split: list[str] = []
        for alias in aliases:
            name, _, local = (p.strip() for p in alias.partition(" as "))
            full = f"{module}.{name}"
            if (module, name) in NAME_MOVES:
                clause = name if not local or local == name else f"{name} as {local}"
                split.append(f"{indent}from {NAME_MOVES[module, name]} import {clause}")
            elif full in self.modules and self.modules[full] != full:
                parent, _, leaf = self.modules[full].rpartition(".")
                as_name = local or name
                clause = leaf if leaf == as_name else f"{leaf} as {as_name}"
                split.append(f"{indent}from {parent} import {clause}")
            else:
                kept.append(alias)
        if not split:
            return match[0].replace(module, self._module(module), 1)
        lines = []
        if kept:
            lines.append(f"{indent}from {self._module(module)} import {', '.join(kept)}")
        lines.extend(split)
        comment = tail.strip()
        if comment and len(lines[0]) + len(tail) > LINE_LIMIT:
            lines.insert(0, f"{indent}{comment}")  # above, rather than wrapped into parentheses
        elif comment:
            lines[0] += tail
        return "\n".join(lines)

    def _path(self, match: re.Match[str]) -> str:
        text = match[0]
        rel = text[len(PACKAGE) + 1 :]
        if rel.endswith(".py"):
            new = self.moves.get(rel)
            return f"{PACKAGE}/{new}" if new else text
        folder = rel.rstrip("/")
        if folder in self.folders:
            return f"{PACKAGE}/{self.folders[folder]}" + ("/" if text.endswith("/") else "")
        return text

    def rewrite(self, text: str, markdown: bool) -> str:
        """Rewrite one file's text.

        Args:
            text: the file's contents.
            markdown: the file is documentation (public names such as ``streamvec.merge``
                stay as users write them).

        Returns:
            The new contents.
        """
        out: list[str] = []
        # Work line-block by line-block so that `retree: keep` lines pass untouched.
        chunks = re.split(r"(^[^\n]*" + re.escape(KEEP_MARK) + r"[^\n]*$)", text, flags=re.M)
        for number, chunk in enumerate(chunks):
            if number % 2:
                out.append(chunk)
                continue
            kept: list[str] = []

            def hold(m: re.Match[str], kept: list[str] = kept) -> str:
                kept.append(m[0])
                return f"\0{len(kept) - 1}\0"

            def hold_text(text: str, kept: list[str] = kept) -> str:
                kept.append(text)
                return f"\0{len(kept) - 1}\0"

            def public(m: re.Match[str]) -> str:
                # `streamvec.merge` and its exported names, as users write them.
                attr = m[1][1:] if m[1] else None
                return hold(m) if attr is None or attr in self.shim_names else m[0]

            chunk = _KEEP.sub(hold, chunk)
            if markdown:
                for shim in self.shim_modules:
                    chunk = re.sub(r"(?<![\w.])" + re.escape(shim) + r"(\.\w+)?\b", public, chunk)
            # A rewritten import is final: the dotted pass below must not rename it again.
            chunk = _FROM.sub(lambda m: hold_text(self._from_import(m)), chunk)
            chunk = _DOTTED.sub(lambda m: self._module(m[0]), chunk)
            chunk = _PATH.sub(self._path, chunk)
            chunk = re.sub(r"\0(\d+)\0", lambda m, kept=kept: kept[int(m[1])], chunk)
            out.append(chunk)
        return "".join(out)


def files_to_rewrite(root: Path) -> list[Path]:
    """The text files whose references are rewritten.

    Args:
        root: the repository root.

    Returns:
        Their paths.
    """
    found: list[Path] = []
    for folder in REWRITE_DIRS:
        base = root / folder
        if base.is_dir():
            for path in sorted(base.rglob("*")):
                if (
                    path.is_file()
                    and not path.is_symlink()
                    and "__pycache__" not in path.parts
                    and path.suffix in TEXT_SUFFIXES
                ):
                    found.append(path)
    found.extend(root / name for name in REWRITE_FILES if (root / name).is_file())
    return found


def rewrite_tree(root: Path, plan: Plan) -> tuple[int, dict[Path, set[str]]]:
    """Rewrite every reference under ``root``.

    Args:
        root: the repository root.
        plan: the plan.

    Returns:
        (number of files changed, {changed Python file: its lines over the limit before}).
    """
    rewriter = Rewriter(plan)
    changed = 0
    touched: dict[Path, set[str]] = {}
    for path in files_to_rewrite(root):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        new = rewriter.rewrite(text, markdown=path.suffix == ".md")
        for warning in rewriter.warnings:
            print(f"  CHECK {path.relative_to(root)}: {warning}")
        rewriter.warnings.clear()
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed += 1
            if path.suffix == ".py":
                touched[path] = {line for line in text.splitlines() if len(line) > LINE_LIMIT}
    return changed, touched


def _split_at(line: str, limit: int) -> int | None:
    """Where to break a prose line so that its first part fits: the last space that does."""
    cut = line.rfind(" ", 0, limit + 1)
    indent = len(line) - len(line.lstrip())
    return cut if cut > indent + 2 else None


def wrap_long_lines(root: Path, touched: dict[Path, set[str]]) -> list[str]:
    """Wrap docstring and comment lines that the longer module paths pushed over the limit.

    ruff format wraps code but not prose. A docstring line is broken at its last fitting
    space and continues at the same indent (two more under a ``-`` bullet); a comment
    continues as a comment. Long lines of code or one-line strings are returned instead.

    Args:
        root: the repository root.
        touched: the Python files rewritten, with their lines over the limit before.

    Returns:
        ``path:line`` of each long line left for a person.
    """
    left: list[str] = []
    for path, before in touched.items():
        text = path.read_text(encoding="utf-8")
        prose = _prose_lines(text)
        out: list[str] = []
        for number, line in enumerate(text.splitlines(), 1):
            pending = line
            while len(pending) > LINE_LIMIT and pending not in before:
                cut = _split_at(pending, LINE_LIMIT)
                kind = prose.get(number)
                if cut is None or kind is None:
                    left.append(f"{path.relative_to(root)}:{number}")
                    break
                head, rest = pending[:cut], pending[cut + 1 :]
                indent = pending[: len(pending) - len(pending.lstrip())]
                if kind == "comment":
                    indent += "# "
                elif pending.lstrip().startswith(("- ", "* ")):
                    indent += "  "
                out.append(head.rstrip())
                pending = indent + rest.lstrip()
            out.append(pending)
        new = "\n".join(out) + ("\n" if text.endswith("\n") else "")
        if new != text:
            path.write_text(new, encoding="utf-8")
    return left


def _prose_lines(text: str) -> dict[int, str]:
    """Line numbers that are whole-line comments or inside a triple-quoted string."""
    kinds: dict[int, str] = {}
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return kinds
    lines = text.splitlines()
    for tok in tokens:
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1].lstrip().startswith("#"):
            kinds[tok.start[0]] = "comment"
        elif tok.type == tokenize.STRING and tok.string.endswith(('"""', "'''")):
            # Not the first line (it holds the quotes and maybe code before them).
            for number in range(tok.start[0] + 1, tok.end[0] + 1):
                kinds[number] = "docstring"
            if tok.start[1] == len(lines[tok.start[0] - 1]) - len(lines[tok.start[0] - 1].lstrip()):
                kinds[tok.start[0]] = "docstring"
    return kinds


def run_ruff(root: Path, ruff: str | None) -> str:
    """Re-sort imports and reformat (the rename changes both), when ruff is available.

    Args:
        root: the repository root.
        ruff: the ruff executable, or None to look for one.

    Returns:
        What was done, in one line.
    """
    candidates = [ruff] if ruff else [shutil.which("ruff"), str(root / ".venv/bin/ruff")]
    exe = next((c for c in candidates if c and Path(c).exists()), None)
    if exe is None:
        return "ruff not found: run `ruff check --select I --fix . && ruff format .` by hand"
    subprocess.run([exe, "check", "--select", "I", "--fix", "-q", "."], cwd=root, check=False)
    subprocess.run([exe, "format", "-q", "."], cwd=root, check=False)
    return f"imports re-sorted and formatted with {exe}"


def print_plan(plan: Plan) -> None:
    """Print the moves, the new packages and the unknown modules.

    Args:
        plan: the plan.
    """
    for old, new in sorted(plan.moves.items(), key=lambda kv: kv[1]):
        if old != new:
            print(f"  move  {PACKAGE}/{old} -> {PACKAGE}/{new}")
    for rel in plan.emptied:
        print(f"  drop  {PACKAGE}/{rel} (its package moved)")
    for shim, target in plan.shims.items():
        print(f"  shim  {PACKAGE}/{shim} re-exports {_dotted(target + '/__init__.py')}")
    moved = sum(old != new for old, new in plan.moves.items())
    print(f"{moved} modules move, {len(plan.moves) - moved} stay")


def main(argv: list[str] | None = None) -> int:
    """Plan or carry out the move.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="repository root (a git checkout)")
    parser.add_argument("--check", action="store_true", help="print the plan, change nothing")
    parser.add_argument("--ruff", help="ruff executable (default: on PATH, then .venv/bin)")
    parser.add_argument(
        "--allow-dirty", action="store_true", help="run on a tree with uncommitted changes"
    )
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    if not (root / PACKAGE).is_dir():
        print(f"error: {root} has no {PACKAGE}/ folder; pass the repository root", file=sys.stderr)
        return 2
    try:
        plan = make_plan(root)
    except RetreeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_plan(plan)
    if not args.check:
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no").strip()
        if dirty and not args.allow_dirty:
            print(
                "error: the working tree has uncommitted changes; commit them first "
                "(or pass --allow-dirty)",
                file=sys.stderr,
            )
            return 2
        apply_moves(root, plan)
        changed, touched = rewrite_tree(root, plan)
        # After the rewrite: these name the new modules already.
        write_entry_points(root, plan)
        print(f"references rewritten in {changed} files")
        print(run_ruff(root, args.ruff))
        for where in wrap_long_lines(root, touched):
            print(f"  longer than {LINE_LIMIT} after the rename (fix by hand): {where}")
    for rel in plan.unknown:
        print(f"UNPLACED: {PACKAGE}/{rel} (not in the table: left in place; move it by hand)")
    return 1 if plan.unknown else 0


if __name__ == "__main__":
    sys.exit(main())
