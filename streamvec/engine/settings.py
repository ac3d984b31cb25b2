"""Run settings: one frozen type for every option of how a command runs, validated once.

:class:`Settings` is the single home of the options every writing command shares (workers,
scheduler, memory limit, device, block size, resume, finite check, compression, shard size,
input policies...). Each field carries its command-line :class:`Flag`, so the CLI's flags are
generated from this class (:func:`add_arguments`) and read back by :meth:`Settings.from_args`;
the Python API takes the same names as keywords (``model.save(out, workers=2, resume=True)``
is ``Settings(workers=2, resume=True).engine_kwargs()``). An operation declares which settings
it supports (:mod:`streamvec.ops.registry`); :meth:`Settings.check_supported` refuses any other
one that was given, in one place and with one message, so no code path drops a setting.

Example:
    >>> s = Settings(workers=2, memory_limit="4GB")
    >>> s.resolved_workers(), s.resolved_limit()
    (2, 4000000000)
    >>> sorted(k for k, v in s.given().items())
    ['memory_limit', 'workers']
"""

from __future__ import annotations

import argparse
import numbers
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, TypeVar

from streamvec.errors import StreamvecError

__all__ = [
    "COMPRESSIONS",
    "ENGINE_SETTINGS",
    "Flag",
    "Settings",
    "add_arguments",
    "distributed_client",
    "local_cluster_workers",
]

COMPRESSIONS = ("lz4", "zstd", "none")
VOCAB_POLICIES = ("base", "common", "union")
INT_POLICIES = ("error", "base", "finetune")  # streamvec.model.nonfloat.INT_POLICIES
# The local schedulers; anything else is ``local:N`` or a dask.distributed address.
LOCAL_SCHEDULERS = ("threads", "processes", "sync", "synchronous")

S = TypeVar("S", bound="Settings")


@dataclass(frozen=True)
class Flag:
    """How one setting appears on the command line.

    Attributes:
        help: the ``--help`` text.
        metavar: the value's placeholder (options with a value).
        choices: the allowed values.
        type: argparse's converter (``int``; sizes stay strings and are parsed here).
        negative: for a setting that is on by default: the ``--no-...`` flag that turns it off.
        hidden: accepted for compatibility, not listed (``--check-finite``, now the default).
    """

    help: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    type: Any = None
    negative: str | None = None
    hidden: tuple[str, ...] = ()


def _setting(default: Any, flag: Flag | None = None) -> Any:
    return field(default=default, metadata={"flag": flag})


def local_cluster_workers(scheduler: str) -> int | None:
    """The N of ``local:N`` (a LocalCluster of N processes), None for other schedulers.

    The one parser of scheduler names, so every command refuses a bad one the same way.

    Raises:
        StreamvecError: ``local:`` followed by anything but a positive integer.

    Example:
        >>> local_cluster_workers("local:3"), local_cluster_workers("threads")
        (3, None)
    """
    if not scheduler.startswith("local:"):
        return None
    text = scheduler.split(":", 1)[1]
    if not text.isdigit() or int(text) < 1:
        raise StreamvecError(
            f"--scheduler {scheduler}: write local:N with N worker processes (e.g. local:2)"
        )
    return int(text)


@contextmanager
def distributed_client(scheduler: str) -> Iterator[Any]:
    """A ``dask.distributed`` client for ``local:N`` or a scheduler address, closed on exit.

    The one front-end of the distributed schedulers: the engine's runs and the SVD commands
    open them here, so a bad name or an unreachable address fails the same way (exit 2).

    Raises:
        StreamvecError: a bad ``local:N``, or an address that cannot be reached.
    """
    from distributed import Client, LocalCluster

    cluster = None
    n = local_cluster_workers(scheduler)
    if n is not None:
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)
    else:
        try:
            client = Client(scheduler, timeout="10s")
        except OSError as exc:
            raise StreamvecError(
                f"--scheduler {scheduler}: cannot reach a dask.distributed scheduler ({exc}); "
                "use threads, processes, sync, local:N or a scheduler address"
            ) from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


@dataclass(frozen=True)
class Settings:
    """How a command runs: every option the engine and the operations share.

    Attributes:
        workers: blocks in flight at once (default: CPU count).
        scheduler: ``threads``, ``processes``, ``sync``, ``local:N`` or a scheduler address.
        memory_limit: ceiling on anonymous memory (``"4GB"``; default: half of available).
        progress: show progress bars.
        overwrite: replace an existing output once the new one is complete.
        block_size: target float32 bytes per row block (default 32 MB; lowered to fit the
            memory limit).
        check_finite: fail, naming the tensor and rows, on NaN or infinite results.
        resume: continue an interrupted run writing the same output.
        device: where block arithmetic and SVDs run: ``cpu``, ``cuda``/``cuda:N``, ``torch-cpu``.
        compression: Zarr chunk compression: ``lz4``, ``zstd`` or ``none``.
        shard_size: safetensors shard size.
        sync_seconds: how often finished blocks are made durable and logged for resume.
        verify_inputs: compare each chunk read from a Zarr store with its checksum.
        vocab: when the inputs' vocabularies differ: ``base``, ``common``, ``union`` (None:
            refuse).
        strict: a LoRA adapter recorded with another local base is an error, not a warning.
        int_tensors: an integer/bool tensor a fine-tune changed: ``error``, ``base``,
            ``finetune``.
    """

    # The first nine fields keep the order of the former ``ops.svd.RunOptions`` (positional
    # callers).
    workers: int | None = _setting(
        None, Flag("blocks in flight at once (default: CPU count)", "N", type=int)
    )
    scheduler: str = _setting(
        "threads",
        Flag(
            "threads (default), processes, sync, local:N (a LocalCluster of N worker "
            "processes) or a dask.distributed scheduler address like tcp://host:8786",
            "S",
        ),
    )
    memory_limit: str | int | None = _setting(
        None,
        Flag(
            "ceiling on anonymous memory, e.g. 4GB (default: half of the available RAM); "
            "block sizes are chosen to stay under it",
            "SIZE",
        ),
    )
    progress: bool = _setting(True)  # the CLI's: not --quiet and stderr is a terminal
    overwrite: bool = _setting(False, Flag("replace OUT once the new one is complete"))
    block_size: str | int | None = _setting(
        None,
        Flag(
            "target float32 bytes per row block (default 32MB; lowered to fit --memory-limit)",
            "SIZE",
        ),
    )
    check_finite: bool = _setting(
        True,
        Flag(
            "write NaN/inf results instead of failing (by default every output block is "
            "checked and a NaN/inf fails the run, naming the tensor and rows; see "
            "docs/reliability.md)",
            negative="--no-check-finite",
            # The check is on by default; the old opt-in flag is still accepted.
            hidden=("--check-finite",),
        ),
    )
    resume: bool = _setting(
        False,
        Flag(
            "continue an interrupted run writing OUT (inputs and parameters must match); only "
            "unfinished blocks are redone and the result is identical to an uninterrupted run"
        ),
    )
    device: str = _setting(
        "cpu",
        Flag(
            "where block arithmetic and SVDs run: cpu (default, numpy) or cuda / cuda:N "
            "(torch on a GPU; same results bit for bit for sums; torch-cpu runs that code on "
            "the CPU, to check it); see docs/distributed.md",
            "D",
        ),
    )
    compression: str = _setting(
        "lz4",
        Flag(
            "Zarr chunk compression (default lz4: blosc lz4 with bit-shuffle; see "
            "docs/benchmarks.md)",
            choices=COMPRESSIONS,
        ),
    )
    shard_size: str | int = _setting("5GB", Flag("safetensors shard size (default 5GB)", "SIZE"))
    sync_seconds: float | None = _setting(None)  # API and STREAMVEC_SYNC_SECONDS only
    verify_inputs: bool = _setting(
        True,
        Flag(
            "do not compare each chunk read from a Zarr store with its recorded checksum "
            "(see docs/reliability.md for what it costs)",
            negative="--no-verify-inputs",
        ),
    )
    vocab: str | None = _setting(
        None,
        Flag(
            "when the inputs' vocabularies differ (a fine-tune added tokens): keep the base's "
            "rows, the rows all inputs share, or every row (added tokens as the fine-tune has "
            "them); config.json's vocab_size and the tokenizer files follow. Default: refuse",
            choices=VOCAB_POLICIES,
        ),
    )
    strict: bool = _setting(
        False,
        Flag("a LoRA adapter input recorded with another local base is an error, not a warning"),
    )
    int_tensors: str = _setting(
        "error",
        Flag(
            "an integer/bool tensor (buffer, int8 weight) that a fine-tune changed: fail "
            "(default), keep the base's value, or take the fine-tune's",
            choices=INT_POLICIES,
        ),
    )

    def __post_init__(self) -> None:
        # Validated once, here: every door (CLI, Python API, recipes) builds this object.
        from streamvec.units import parse_size

        # 0 means the default (the CPU count), as it always has
        if self.workers is not None and (
            isinstance(self.workers, bool)
            or not isinstance(self.workers, numbers.Integral)  # numpy integers too
            or self.workers < 0
        ):
            raise StreamvecError(f"--workers must be at least 1, got {self.workers!r}")
        if not isinstance(self.scheduler, str) or not self.scheduler:
            raise StreamvecError(
                f"--scheduler must be a name or an address, got {self.scheduler!r}"
            )
        local_cluster_workers(self.scheduler)
        for label, value in (
            ("--memory-limit", self.memory_limit),
            ("--block-size", self.block_size),
            ("--shard-size", self.shard_size),
        ):
            if value is not None and parse_size(value) < 1:
                raise StreamvecError(f"{label} must be positive, got {value!r}")
        for label, value, allowed in (
            ("--compression", self.compression, COMPRESSIONS),
            ("--int-tensors", self.int_tensors, INT_POLICIES),
            ("--vocab", self.vocab, (None, *VOCAB_POLICIES)),
        ):
            if value not in allowed:
                names = ", ".join(a for a in allowed if a)
                raise StreamvecError(f"{label} must be one of {names}, got {value!r}")

    # -- doors -----------------------------------------------------------------------------

    @classmethod
    def from_args(cls: type[S], args: argparse.Namespace) -> S:
        """The settings of parsed command-line arguments (flags from :func:`add_arguments`).

        Flags a command does not define keep their defaults; ``progress`` is on unless
        ``--quiet`` or stderr is not a terminal.
        """
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.metadata.get("flag") is not None and hasattr(args, f.name):
                values[f.name] = getattr(args, f.name)
        values["progress"] = not getattr(args, "quiet", False) and sys.stderr.isatty()
        return cls(**values)

    @classmethod
    def from_kwargs(cls: type[S], kwargs: Mapping[str, Any], **more: Any) -> S:
        """Settings from keyword arguments (``.save(...)`` keywords and the like).

        Raises:
            StreamvecError: a keyword that is no setting (the message lists them).
        """
        merged = {**kwargs, **more}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - names)
        if unknown:
            raise StreamvecError(
                f"unknown run setting(s) {', '.join(unknown)}; settings are: "
                f"{', '.join(sorted(names))}"
            )
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        """Every setting as plain values (JSON-ready), in field order."""
        return asdict(self)

    def output_identity(self) -> dict[str, Any]:
        """The settings that decide what a command writes: part of its job's identity.

        A resumed run must have the same (``--resume`` with another ``--vocab`` or
        ``--compression`` is refused by name). How fast and where a run goes (workers,
        scheduler, memory limit, device) is not identity: the SVD commands record the budget
        their plans came from and a resumed run reuses it, so results stay identical.
        """
        return {name: getattr(self, name) for name in OUTPUT_SETTINGS}

    def plan_budget(self) -> dict[str, Any]:
        """The resolved settings a factorization's plan is made from.

        The SVD commands record them with their job and a resumed run reuses them
        (:meth:`with_budget`): the block height enters the rounding of the QR factorizations,
        so a resumed run factors every matrix exactly as the unfinished one would have.
        """
        return {
            "memory_limit": self.resolved_limit(),
            "workers": self.resolved_workers(),
            "block_size": self.block_bytes(),
        }

    def with_budget(self: S, budget: Mapping[str, Any]) -> S:
        """A copy with a recorded :meth:`plan_budget` in place of this run's."""
        return replace(
            self,
            memory_limit=budget["memory_limit"],
            workers=budget["workers"],
            block_size=budget["block_size"],
        )

    def given(self) -> dict[str, Any]:
        """The settings that differ from their defaults: what the user asked for."""
        out = {}
        for f in fields(self):
            default = f.default if f.default is not MISSING else None
            value = getattr(self, f.name)
            if value != default:
                out[f.name] = value
        return out

    def check_supported(self, command: str, supported: Iterable[str], context: str = "") -> None:
        """Refuse a setting ``command`` does not support, if it was given.

        Args:
            command: the command, e.g. ``lora``.
            supported: the names of the settings it honours.
            context: more words after the command (``" with merge_method tsv"``).

        Raises:
            StreamvecError: naming the flag and the command.
        """
        allowed = set(supported) | {"progress"}  # progress is display only
        for name in self.given():
            if name in allowed:
                continue
            flag = _flag_spelling(name, getattr(self, name))
            raise StreamvecError(
                f"{flag} is not supported by `streamvec {command}`{context}; rerun without it"
            )

    def only(self: S, names: Iterable[str]) -> S:
        """A copy with every setting outside ``names`` back at its default (progress kept).

        For an operation run as one step of another that already checked the settings.
        """
        keep = set(names) | {"progress"}
        defaults: dict[str, Any] = {
            f.name: f.default
            for f in fields(self)
            if f.name not in keep and getattr(self, f.name) != f.default
        }
        return replace(self, **defaults)

    def replace(self: S, **changes: Any) -> S:
        """A copy with some settings changed (validated again)."""
        return replace(self, **changes)

    def with_keywords(self: S, **keywords: Any) -> S:
        """A copy holding the settings an API function also takes as its own keywords.

        ``svd(..., vocab="base")`` and ``svd(..., run=Settings(vocab="base"))`` say the same;
        the function folds the keyword in here once and reads only the settings from then on,
        so the job identity, the checks and the run all see one value. A keyword left at its
        default (None, False) is not given.

        Raises:
            StreamvecError: a keyword and the settings give a setting two different values.
        """
        changes = {}
        for name, value in keywords.items():
            if value is None or value is False:
                continue
            held = getattr(self, name)
            if held not in (None, False) and held != value:
                raise StreamvecError(
                    f"{name}={value!r} is given twice, as a keyword and as {name}={held!r} in "
                    "the settings; give it once"
                )
            changes[name] = value
        return replace(self, **changes) if changes else self

    # -- views for the layers below ----------------------------------------------------------

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`streamvec.engine.execute.run` (and ``Model.save``)."""
        return {name: getattr(self, name) for name in ENGINE_SETTINGS}

    def resolved_workers(self) -> int:
        """The worker count (default: the CPU count)."""
        return self.workers or os.cpu_count() or 1

    def resolved_limit(self) -> int:
        """The memory limit in bytes (default: half of the available memory)."""
        from streamvec.memory import default_memory_limit
        from streamvec.units import parse_size

        if self.memory_limit is None:
            return default_memory_limit()
        return parse_size(self.memory_limit)

    def block_bytes(self) -> int:
        """Target bytes of a float32 row block."""
        from streamvec.model.tensor import DEFAULT_BLOCK_BYTES
        from streamvec.units import parse_size

        return DEFAULT_BLOCK_BYTES if self.block_size is None else parse_size(self.block_size)


# The settings that change an output's bytes (or whether it is written at all).
OUTPUT_SETTINGS = ("compression", "shard_size", "vocab", "int_tensors", "check_finite")

# The settings streamvec.engine.execute.run takes, by the same names.
ENGINE_SETTINGS = (
    "workers",
    "scheduler",
    "memory_limit",
    "progress",
    "overwrite",
    "resume",
    "check_finite",
    "block_size",
    "shard_size",
    "compression",
    "sync_seconds",
    "device",
)


def _flag_spelling(name: str, value: Any) -> str:
    spec: Flag | None = next(f for f in fields(Settings) if f.name == name).metadata.get("flag")
    if spec is not None and spec.negative and value is False:
        return spec.negative
    return "--" + name.replace("_", "-")


def add_arguments(
    parser: argparse.ArgumentParser | Any, names: Iterable[str] | None = None
) -> None:
    """Add the flags of settings to a parser, as defined on :class:`Settings`' fields.

    Flags already on the parser are left as they are, so adding a setting twice is harmless.

    Args:
        parser: a parser or an argument group.
        names: the settings to add (default: every setting with a flag).
    """
    wanted = None if names is None else set(names)
    # A flag the command already defines (its own wording, or added by a helper) is kept.
    present = getattr(parser, "_option_string_actions", {})
    for f in fields(Settings):
        spec: Flag | None = f.metadata.get("flag")
        if spec is None or (wanted is not None and f.name not in wanted):
            continue
        if (spec.negative or "--" + f.name.replace("_", "-")) in present:
            continue
        if spec.negative:
            parser.add_argument(
                spec.negative, dest=f.name, action="store_false", default=f.default, help=spec.help
            )
            for hidden in spec.hidden:
                parser.add_argument(
                    hidden,
                    dest=f.name,
                    action="store_true",
                    default=f.default,
                    help=argparse.SUPPRESS,
                )
        elif isinstance(f.default, bool):
            parser.add_argument(
                "--" + f.name.replace("_", "-"), action="store_true", help=spec.help
            )
        else:
            kwargs: dict[str, Any] = {"default": f.default, "help": spec.help}
            if spec.metavar:
                kwargs["metavar"] = spec.metavar
            if spec.choices:
                kwargs["choices"] = list(spec.choices)
            if spec.type is not None:
                kwargs["type"] = spec.type
            parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)
