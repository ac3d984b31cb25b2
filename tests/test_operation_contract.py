"""The contract every writing operation keeps, run against each entry of the operations table.

In the style of zarr's ``StoreTests``: :class:`OperationContract` states the contract once;
each operation (and each merge method, which runs under ``merge``) is one parametrization.

* Every operation supports ``--resume``: killed (SIGKILL) mid-run, in each of its phases (the
  SVD merges factor into a hidden job of their own before the output pass), and resumed, it
  writes an output identical byte for byte to an uninterrupted run's, and leaves no job
  behind.
* A setting an operation does not support is refused (exit 2, one line naming the flag and
  the command) rather than ignored: ``tests/test_settings.py`` checks each flag against each
  command.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streamvec.ops.registry import OPERATIONS, MergeMethodEntry, commands
from streamvec.tools import synth

from .conftest import run_cli, run_cli_subprocess
from .faults import recipe
from .test_reliability import SMALL, kill_after, output_bytes

SHAPE = synth.LlamaShape(hidden=128, intermediate=352, layers=2, heads=2, kv_heads=1, vocab=1024)

# every merge method of the table, with the recipe parameters of a small run
SMALL_PARAMETERS = {
    "shared_unique": "rank: 2, threshold: 0.5",
    "tsv": "rank: 2",
    "iso_c": "rank: 2",
}
MERGES = {
    name: SMALL_PARAMETERS.get(name, "")
    for name, entry in OPERATIONS.items()
    if isinstance(entry, MergeMethodEntry)
}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract")
    base = synth.build_checkpoint(root / "base", shape=SHAPE, shard_size="400kB", seed=0)
    return {
        "base": base,
        "a": synth.build_finetune(base, root / "a", rank=4, seed=1),
        "b": synth.build_finetune(base, root / "b", rank=4, seed=2),
    }


def argv(name: str, fam: dict[str, Path], out: Path, scratch: Path) -> list[str]:
    """The command line of operation ``name`` (``merge-METHOD`` for a merge method)."""
    base, a, b = (str(fam[k]) for k in ("base", "a", "b"))
    rank = ["--rank", "2"]
    calls = {
        "diff": ["diff", base, a],
        "combine": ["combine", "--base", base, f"{a}:0.5", f"{b}:-0.3", "--shard-size", "600kB"],
        "svd": ["svd", a, "--base", base, *rank, "--method", "randomized"],
        "lora": ["lora", base, a, *rank],
        "decompose": ["decompose", a, b, "--base", base, *rank],
        "merge-svd": ["merge-svd", "tsv", a, b, "--base", base, *rank],
    }
    if name.startswith("merge-") and name != "merge-svd":
        method = name.removeprefix("merge-")
        path = recipe(scratch / f"{method}.yaml", method, fam, MERGES[method])
        return ["merge", str(path), "-o", str(out), "-q", *SMALL]
    return [*calls[name], "-o", str(out), "-q", *SMALL]


# The jobs an operation runs before its output pass (hidden siblings of OUT), in order.
INTERMEDIATES = {
    "merge-svd": ".out.factors",
    "merge-tsv": ".out.factors",
    "merge-iso_c": ".out.factors",
    "merge-shared_unique": ".out.components",
}


CASES = [op.name for op in commands() if op.name != "merge"] + [f"merge-{m}" for m in MERGES]


def test_every_operation_is_under_contract() -> None:
    covered = {n if n == "merge-svd" else n.removeprefix("merge-") for n in CASES}
    assert covered | {"merge"} == set(OPERATIONS)
    assert all("resume" in op.settings for op in commands())


def test_the_table_is_what_the_command_line_and_recipes_reach() -> None:
    from streamvec.cli.main import build_parser, command_modules
    from streamvec.ops.merge.registry import METHODS, get_method

    # every command entry is a sub-command, through its own command-line module
    modules = command_modules()
    for op in commands():
        assert modules[op.name] == op.cli
        cli = op.command()
        assert cli.HELP and callable(cli.add_arguments) and callable(cli.run)
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(modules)  # type: ignore[arg-type]
    # every merge method entry is the method a recipe names, loaded from its module
    entries = [e for e in OPERATIONS.values() if isinstance(e, MergeMethodEntry)]
    assert list(METHODS) == [e.name for e in entries]
    for entry in entries:
        assert get_method(entry.name) is entry.load() and entry.load().name == entry.name
    # building the command line imports no operation: a command starts with its own only
    implementations = sorted({op.module for op in OPERATIONS.values()})
    code = (
        "import sys; from streamvec.cli.main import build_parser; build_parser(); "
        f"print([m for m in {implementations!r} if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


class OperationContract:
    """What every writing operation guarantees; subclasses say which operation."""

    name: str

    def test_resume(self, family: dict[str, Path], tmp_path: Path) -> None:
        # The reference is written under the same name (then moved aside): provenance may
        # name the output's own intermediates (shared_unique's components).
        out = tmp_path / "out"
        cmd = argv(self.name, family, out, tmp_path)
        assert run_cli(*cmd) == 0
        want = output_bytes(out.rename(tmp_path / "reference"))
        phases = [INTERMEDIATES.get(self.name), None]  # None: the output's own job
        for job in phases if phases[0] else phases[1:]:
            logged = kill_after(cmd, out, 2, job)
            assert logged >= 2, job
            assert not out.exists(), "a killed run must not leave a finished-looking output"
            proc = run_cli_subprocess(*cmd, "--resume")
            assert proc.returncode == 0, proc.stderr
            got = output_bytes(out)
            assert got.keys() == want.keys()
            for path in want:
                assert got[path] == want[path], f"{self.name}: {path} differs after resume"
            left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out"))
            assert left == [], f"{self.name}: {left} left behind"
            shutil.rmtree(out)


@pytest.mark.parametrize("name", CASES)
class TestOperations(OperationContract):
    @pytest.fixture(autouse=True)
    def _name(self, name: str) -> None:
        self.name = name
