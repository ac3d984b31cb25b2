"""Hugging Face model ids as inputs: ``org/name`` or ``org/name@revision``.

Wherever a local checkpoint path is accepted, a model id is too, and a local path that exists
always wins. The id is resolved through ``huggingface_hub`` to a snapshot folder of its cache:
the cache first (no network), and a download only when the cache lacks it and the Hub is not
off (``HF_HUB_OFFLINE``). Only safetensors weights, their index and the config and tokenizer
files are fetched; pickles never are.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from streamvec.errors import InputNotFoundError

# What a model id looks like: one slash, Hub-legal names, an optional @revision.
_HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[A-Za-z0-9._/-]+))?$"
)
ALLOW_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "tokenizer.model",
    "merges.txt",
    "*.jinja",
)


@dataclass(frozen=True)
class HubSnapshot:
    """A model id resolved to a folder of the local cache.

    Attributes:
        repo_id: ``org/name``.
        revision: the revision asked for (None: the default branch).
        path: the snapshot folder (``.../models--org--name/snapshots/<commit>``).
    """

    repo_id: str
    revision: str | None
    path: Path

    @property
    def commit(self) -> str:
        """The commit the snapshot folder holds (its name)."""
        return self.path.name


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``text`` looks like a model id, else None.

    Example:
        >>> parse_hub_id("Qwen/Qwen3-0.6B@main")
        ('Qwen/Qwen3-0.6B', 'main')
        >>> parse_hub_id("./ckpt") is None
        True
    """
    m = _HUB_ID.match(text)
    if m is None:
        return None
    return m.group("repo"), m.group("rev")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_hub_id(text: str) -> HubSnapshot:
    """Find (or fetch) a model id's snapshot folder.

    Args:
        text: ``org/name`` or ``org/name@revision``.

    Returns:
        The :class:`HubSnapshot`.

    Raises:
        InputNotFoundError: not a model id, not in the cache while offline, or not on the Hub.
    """
    parsed = parse_hub_id(text)
    if parsed is None:
        raise InputNotFoundError(f"{text}: no such file or directory")
    repo_id, revision = parsed
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ModuleNotFoundError:
        raise InputNotFoundError(
            f"{text}: no such file or directory (and huggingface_hub, which resolves model "
            "ids, is not installed: `pip install huggingface_hub`)"
        ) from None

    def fetch(local_files_only: bool) -> HubSnapshot:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=list(ALLOW_PATTERNS),
            local_files_only=local_files_only,
            # Read now, not when huggingface_hub was imported: the variable may change.
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        )
        return HubSnapshot(repo_id, revision, Path(folder))

    try:
        return fetch(local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        if _offline():
            raise InputNotFoundError(
                f"{text}: neither a local path nor a model in the Hugging Face cache "
                f"({os.environ.get('HF_HUB_CACHE', 'the default cache')}), and HF_HUB_OFFLINE "
                "is set; unset it to download, or pass a local directory"
            ) from None
    try:
        return fetch(local_files_only=False)
    except Exception as exc:  # the Hub's errors are many (network, auth, not found): one line
        raise InputNotFoundError(
            f"{text}: neither a local path nor a model the Hugging Face Hub gave "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); check the "
            "id and revision, log in for gated models, or pass a local directory"
        ) from None


__all__ = ["ALLOW_PATTERNS", "HubSnapshot", "parse_hub_id", "resolve_hub_id"]
