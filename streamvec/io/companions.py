"""The files that go next to an output's weights: config and tokenizer files, and a model card.

An edited model keeps its base's ``config.json``, ``generation_config.json`` and tokenizer
files, so it loads like the base; a vocabulary policy (:mod:`streamvec.model.vocab`) may change
``vocab_size`` and take the tokenizer files from the input whose vocabulary the output has.

Every output (checkpoint or store) also gets a ``README.md`` model card saying where it came
from: the command or recipe, the inputs with their fingerprints, and streamvec's version, as
users of merge tools expect. The base's own README.md is never copied: it describes the base,
not the edited model.
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
CONFIG_NAME = "config.json"
# Files that describe the model rather than its tokenizer: they always come from the base.
MODEL_FILES = ("config.json", "generation_config.json")

# The command line of the running ``streamvec`` command, set by the CLI for the duration of
# the command (a context variable, so nothing leaks between commands or threads).
COMMAND_LINE: ContextVar[tuple[str, ...] | None] = ContextVar("streamvec_command", default=None)


@dataclass(frozen=True)
class Companions:
    """Non-weight files of a checkpoint output.

    Attributes:
        files: paths copied into the output under their own names.
        config_updates: keys set in the copied ``config.json`` (where the base has them:
            at the top level or in ``text_config``).
        stem: the weight file stem (``model`` or ``diffusion_pytorch_model``).
    """

    files: tuple[str, ...] = ()
    config_updates: Mapping[str, Any] = field(default_factory=dict)
    stem: str = "model"


def companions_for(anchor: Any, vocab: Any) -> Companions:
    """The companions of a model output whose base is ``anchor`` (a Source).

    Args:
        anchor: the base checkpoint (a :class:`~streamvec.model.algebra.Source`).
        vocab: the :class:`~streamvec.model.vocab.VocabChoice` of the run, or None.
    """
    files = list(anchor.extra_files)
    updates: dict[str, Any] = {}
    if vocab is not None:
        updates = vocab.config_updates()
        donor = vocab.tokenizer_from
        if donor is not None and donor is not anchor:
            # The output's rows are the donor's tokens: its tokenizer must come along.
            files = [f for f in files if Path(f).name in MODEL_FILES]
            files += [f for f in donor.extra_files if Path(f).name not in MODEL_FILES]
    return Companions(tuple(files), updates, anchor.stem)


def copy_companions(directory: Path, companions: Companions) -> None:
    """Copy the files, applying ``config_updates`` to ``config.json``."""
    for f in companions.files:
        target = directory / Path(f).name
        if Path(f).name == CONFIG_NAME and companions.config_updates:
            config = json.loads(Path(f).read_text(encoding="utf-8"))
            _update_config(config, companions.config_updates)
            target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(f, target)


def _update_config(config: dict[str, Any], updates: Mapping[str, Any]) -> None:
    for key, value in updates.items():
        placed = False
        for c in (config, config.get("text_config")):
            if isinstance(c, dict) and key in c:
                c[key] = value
                placed = True
        if not placed:
            config[key] = value


def model_card(attrs: Mapping[str, Any], command: Sequence[str] | None = None) -> str:
    """The text of an output's ``README.md`` from its recorded attributes.

    Args:
        attrs: what the run records in ``streamvec.json`` / the store's attrs (operation,
            expression, sources with fingerprints, created_by, merge recipe).
        command: the command line, when run from ``streamvec``.

    Returns:
        Markdown with a YAML front matter (``tags``, ``library_name``) as the Hub reads it.

    Example:
        >>> text = model_card({"operation": "diff", "created_by": "streamvec 0.1"})
    """
    import yaml

    kind = attrs.get("kind", "output")
    sources = [s for s in attrs.get("sources", []) if isinstance(s, Mapping)]
    front: dict[str, Any] = {"tags": ["streamvec", "task-arithmetic"]}
    hub = [s["hub_id"] for s in sources if s.get("hub_id")]
    if hub:
        front["base_model"] = hub[0] if len(hub) == 1 else hub
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines += [
        f"# {attrs.get('operation', 'streamvec output')}",
        "",
        f"A {str(kind).replace('_', ' ')} written by {attrs.get('created_by', 'streamvec')}.",
        "",
    ]
    if command:
        lines += ["## Command", "", "```bash", shlex.join(command), "```", ""]
    merge = attrs.get("merge")
    if isinstance(merge, Mapping) and merge.get("recipe"):
        lines += ["## Recipe", ""]
        if merge.get("recipe_file"):
            lines += [f"From `{merge['recipe_file']}`:", ""]
        lines += ["```yaml", yaml.safe_dump(dict(merge["recipe"]), sort_keys=False).strip()]
        lines += ["```", ""]
    if attrs.get("expression"):
        lines += ["## Expression", "", f"`{attrs['expression']}`", ""]
    if sources:
        lines += [
            "## Inputs",
            "",
            "| input | kind | fingerprint |",
            "| --- | --- | --- |",
        ]
        for s in sources:
            where = s.get("path", "?")
            if s.get("hub_id"):
                where = f"{s['hub_id']}" + (f"@{s['revision']}" if s.get("revision") else "")
            lines.append(f"| `{where}` | {s.get('kind', '?')} | `{s.get('fingerprint', '?')}` |")
        lines += [
            "",
            "Fingerprints are xxh3-128 digests of the input files' names, sizes and safetensors "
            "headers (a quick identity, not a checksum of the data).",
            "",
        ]
    vocab = attrs.get("vocab")
    if isinstance(vocab, Mapping):
        lines += [
            "## Vocabulary",
            "",
            f"Inputs' vocabularies differed: `--vocab {vocab.get('policy')}` gave "
            f"{vocab.get('rows')} rows; tokenizer files from `{vocab.get('tokenizer_from')}`.",
            "",
        ]
    lines += [
        "## Checking it",
        "",
        "Every tensor's checksum is recorded in `streamvec.json` (a checkpoint) or the store's "
        "attributes; `streamvec verify` recomputes them. The base's own README.md is not "
        "copied: it describes the base, not this output.",
        "",
    ]
    return "\n".join(lines)


# Options that say how a run goes, not what it computes: left out of the card's command, so
# that a resumed run, or the same run elsewhere, writes the same card (outputs are identical).
_RUN_FLAGS = {
    "--resume",
    "--overwrite",
    "-q",
    "--quiet",
    "--check-finite",
    "--no-check-finite",
    "--debug",
}
_RUN_OPTIONS = {
    "--workers",
    "--scheduler",
    "--memory-limit",
    "--device",
    "--block-size",
    "--report",
    "--compression",
}
_OUTPUT_OPTIONS = {"-o", "--output"}


def card_command(argv: Sequence[str]) -> list[str]:
    """The command as the card shows it: run options dropped, the output written ``OUT``.

    Example:
        >>> card_command(["streamvec", "diff", "b", "f", "-o", "/x/t.zarr", "--workers", "2"])
        ['streamvec', 'diff', 'b', 'f', '-o', 'OUT']
    """
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag in _RUN_FLAGS:
            continue
        if flag in _RUN_OPTIONS:
            skip = not eq
            continue
        if flag in _OUTPUT_OPTIONS:
            out += [flag, "OUT"] if not eq else [f"{flag}=OUT"]
            skip = not eq and i + 1 < len(argv)
            continue
        out.append(arg)
    return out


def write_model_card(directory: Path, attrs: Mapping[str, Any]) -> None:
    """Write ``README.md`` into an output directory (checkpoint or store).

    The card depends only on what the output is (its attrs and the command that computes
    it), so a resumed run writes the same bytes as an uninterrupted one.
    """
    argv = COMMAND_LINE.get()
    command = card_command(argv) if argv is not None else None
    (directory / CARD_NAME).write_text(model_card(attrs, command), encoding="utf-8")


__all__ = [
    "CARD_NAME",
    "COMMAND_LINE",
    "Companions",
    "card_command",
    "companions_for",
    "copy_companions",
    "model_card",
    "write_model_card",
]
