"""tools/retree.py and tools/import_cycles.py on tiny throwaway repositories.

The fixtures spell the package name through ``PKG`` so that running the move on this
repository leaves them as they are.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = "stream" + "vec"


def _tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel.replace("PKG", PKG)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("PKG", PKG), encoding="utf-8")


def _git_repo(root: Path, files: dict[str, str]) -> Path:
    _write(root, files)
    for args in (
        ["init", "-q"],
        ["add", "-A"],
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tree"],
    ):
        subprocess.run(["git", "-C", str(root), *args], check=True)
    return root


OLD_TREE = {
    "PKG/__init__.py": "from PKG.engine import run\nfrom PKG.errors import Oops\n",
    "PKG/errors.py": "class Oops(Exception):\n    pass\n",
    "PKG/engine.py": "def run():\n    return 1\n\n\ndef read_job():\n    return 2\n",
    "PKG/merge/__init__.py": (
        '"""Merges."""\n\nfrom PKG.merge.api import merge\n\n__all__ = ["merge"]\n'
    ),
    "PKG/merge/api.py": (
        "from PKG import __version__, engine  # the engine\n\n\n"
        "def merge():\n    return engine.run() + 1\n"
    ),
    "PKG/version.py": '__version__ = "1"\n',
    "PKG/cli.py": (
        "import sys\n\n\ndef main(argv=None):\n    print('ran')\n    return 0\n\n\n"
        'if __name__ == "__main__":\n    sys.exit(main())\n'
    ),
    "PKG/newthing.py": "X = 1\n",
    "tests/test_x.py": (
        "import PKG.engine as engine\n"
        "from PKG import engine as eng, errors\n"
        "from PKG.merge import (\n    merge,\n)\n\n"
        'TARGET = "PKG.engine.read_job"\n'
        "OTHER = engine.read_job\n"
    ),
    "docs/a.md": (
        "See `PKG/engine.py` and :mod:`PKG.merge.api`.\n\n"
        "    from PKG.merge import merge\n    python -m PKG.cli diff a b\n"
    ),
    "pyproject.toml": '[project.scripts]\nPKG = "PKG.cli:main"\n',
}


def test_retree_moves_files_and_rewrites_references(tmp_path: Path) -> None:
    retree = _tool("retree")
    root = _git_repo(tmp_path / "repo", OLD_TREE)

    code = retree.main([str(root), "--ruff", str(tmp_path / "no-ruff")])

    assert code == 1  # newthing.py is not in the table: left in place and listed
    pkg = root / PKG
    assert not (pkg / "engine.py").exists() and (pkg / "engine" / "execute.py").is_file()
    assert (pkg / "ops" / "merge" / "api.py").is_file()
    assert (pkg / "cli" / "main.py").is_file() and (pkg / "cli" / "__main__.py").is_file()
    assert (pkg / "newthing.py").is_file()
    assert (pkg / "engine" / "__init__.py").read_text().startswith('"""')
    read = {
        rel: (root / rel).read_text() for rel in ("tests/test_x.py", "docs/a.md", "pyproject.toml")
    }
    moved = (pkg / "ops" / "merge" / "api.py").read_text()
    p = PKG
    assert f"from {p}.engine import execute as engine" in moved
    assert f"from {p}.version import __version__  # the engine" in moved
    assert f"from {p}.engine.execute import run" in (pkg / "__init__.py").read_text()
    test_text = read["tests/test_x.py"]
    assert f"import {p}.engine.execute as engine" in test_text
    assert f"from {p}.engine import execute as eng" in test_text
    assert f"from {p} import errors" in test_text
    assert f"from {p}.ops.merge import (\n    merge,\n)" in test_text
    assert f'"{p}.engine.execute.read_job"' in test_text
    docs = read["docs/a.md"]
    assert f"`{p}/engine/execute.py`" in docs and f":mod:`{p}.ops.merge.api`" in docs
    assert f"from {p}.merge import merge" in docs  # the public name, kept
    assert f"python -m {p}.cli diff" in docs
    assert f'"{p}.cli.main:main"' in read["pyproject.toml"]
    shim = (pkg / "merge.py").read_text()
    assert f"from {p}.ops.merge import (" in shim and '"merge"' in shim

    # The moved package works: the public names, the shim and `python -m PKG.cli`.
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    check = f"import {p}; from {p}.merge import merge; print({p}.run(), merge())"
    done = subprocess.run(
        [sys.executable, "-c", check], env=env, cwd=root, capture_output=True, text=True
    )
    assert done.stdout.split() == ["1", "2"], done.stderr
    done = subprocess.run(
        [sys.executable, "-m", f"{p}.cli"], env=env, cwd=root, capture_output=True, text=True
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ran"), done.stderr

    # Run again: nothing is left to move.
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)
    assert retree.main([str(root), "--check"]) == 2


def test_retree_check_changes_nothing_and_refuses_collisions(tmp_path: Path) -> None:
    retree = _tool("retree")
    files = dict(OLD_TREE)
    files["PKG/engine/execute.py"] = "Y = 2\n"  # where engine.py would go
    root = _git_repo(tmp_path / "repo", files)
    before = sorted(p.relative_to(root) for p in root.rglob("*.py"))

    assert retree.main([str(root), "--check"]) == 2

    assert sorted(p.relative_to(root) for p in root.rglob("*.py")) == before


def test_retree_refuses_a_dirty_tree(tmp_path: Path) -> None:
    retree = _tool("retree")
    root = _git_repo(tmp_path / "repo", OLD_TREE)
    (root / PKG / "engine.py").write_text("changed = True\n")

    assert retree.main([str(root)]) == 2
    assert (root / PKG / "engine.py").is_file()


def test_import_cycles_counts_function_level_imports(tmp_path: Path) -> None:
    cycles = _tool("import_cycles")
    _write(
        tmp_path,
        {
            "PKG/__init__.py": "",
            "PKG/a.py": "from PKG import b\n",
            "PKG/b.py": "def f():\n    from PKG.a import x\n",
            "PKG/c.py": (
                "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from PKG import a\n"
            ),
        },
    )
    graph = cycles.import_graph(tmp_path, PKG)
    groups = cycles.strongly_connected(graph)

    assert groups == [[f"{PKG}.a", f"{PKG}.b"]]
    assert cycles.shortest_cycles(graph, groups[0]) == [[f"{PKG}.a", f"{PKG}.b", f"{PKG}.a"]]
    assert graph[f"{PKG}.c"] == {}  # TYPE_CHECKING imports never run
    assert cycles.main([str(tmp_path), "--package", PKG]) == 1
    (tmp_path / PKG / "b.py").write_text("def f():\n    return 1\n")
    assert cycles.main([str(tmp_path), "--package", PKG]) == 0


@pytest.mark.parametrize("tool", ["retree", "import_cycles"])
def test_tools_refuse_a_root_without_the_package(tmp_path: Path, tool: str) -> None:
    assert _tool(tool).main([str(tmp_path)]) == 2


def test_vocab_is_in_no_import_cycle() -> None:
    # vocab imported algebra (to build a padded SourceTensor), and algebra imports vocab.
    cycles = _tool("import_cycles")
    graph = cycles.import_graph(ROOT, "streamvec")
    tangled = {m for group in cycles.strongly_connected(graph) for m in group}
    assert "streamvec.model.vocab" not in tangled


def test_the_package_has_no_import_cycle() -> None:
    # The last one ran engine.execute -> model.sources -> model.algebra -> (Model.save) the
    # engine, and model.peft_source <-> model.sources (an adapter opening its recorded base).
    cycles = _tool("import_cycles")
    assert cycles.strongly_connected(cycles.import_graph(ROOT, "streamvec")) == []
