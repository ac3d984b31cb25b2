"""Task vectors: ``tau = theta_ft - theta_base`` (Ilharco et al., ICLR 2023)."""

from __future__ import annotations

import os

from streamvec.algebra import Combination
from streamvec.sources import open as open_model


def task_vector(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    dtype: str | None = None,
    vocab: str | None = None,
) -> Combination:
    """The lazy task vector of ``finetuned`` relative to ``base``.

    Args:
        base: base checkpoint.
        finetuned: fine-tuned checkpoint with the same tensor names and shapes.
        include: only tensors matching these globs / ``re:`` regexes.
        exclude: leave out tensors matching these.
        dtype: stored dtype (default float32: exact for bf16 and f16 inputs).
        vocab: ``base``, ``common`` or ``union`` when the vocabularies differ (see
            :mod:`streamvec.vocab`); None refuses a difference.

    Returns:
        A lazy task vector; ``.save("tau.zarr")`` computes it.

    Example:
        >>> task_vector("base", "ft", include=["*.self_attn.*"]).save("tau.zarr")  # doctest: +SKIP
    """
    tv = (open_model(finetuned) - open_model(base)).filter(include, exclude).with_vocab(vocab)
    return tv.astype(dtype) if dtype else tv
