"""Task vectors: ``tau = theta_ft - theta_base`` (Ilharco et al., ICLR 2023)."""

from __future__ import annotations

import os

from streamvec.model.algebra import Combination
from streamvec.model.nonfloat import IntPolicy, NonFloatReader, check_unchanged
from streamvec.model.sources import open as open_model


def task_vector(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    dtype: str | None = None,
    int_tensors: IntPolicy = "error",
    vocab: str | None = None,
    strict: bool = False,
) -> Combination:
    """The lazy task vector of ``finetuned`` relative to ``base``.

    A task vector holds floating-point tensors only. Integer and bool tensors are left out,
    so one the fine-tune changed would be lost without a word when the task vector is added
    back to a base: with ``int_tensors="error"`` (the default) they are read and compared
    here, and a change is an error naming the tensor; ``"base"`` or ``"finetune"`` accept
    leaving it out.

    Args:
        base: base checkpoint.
        finetuned: fine-tuned checkpoint with the same tensor names and shapes, or a PEFT
            LoRA adapter folder (its task vector, with names mapped through ``base``).
        include: only tensors matching these globs / ``re:`` regexes.
        exclude: leave out tensors matching these.
        dtype: stored dtype (default float32: exact for bf16 and f16 inputs).
        int_tensors: ``error`` (default), ``base`` or ``finetune`` (see
            :mod:`streamvec.model.nonfloat`).
        vocab: ``base``, ``common`` or ``union`` when the vocabularies differ (see
            :mod:`streamvec.model.vocab`); None refuses a difference.
        strict: with an adapter, a base other than its recorded local base is an error
            (otherwise a warning naming both).

    Returns:
        A lazy task vector; ``.save("tau.zarr")`` computes it.

    Raises:
        NonFloatChangedError: an integer or bool tensor differs and ``int_tensors`` is
            ``error``.

    Example:
        >>> task_vector("base", "ft", include=["*.self_attn.*"]).save("tau.zarr")  # doctest: +SKIP
    """
    base_model, ft_model = open_model(base), open_model(finetuned, base=base, strict=strict)
    if ft_model.source.info.get("kind") == "lora_adapter":
        tv = ft_model.filter(include, exclude)  # already a task vector, of float tensors only
    else:
        tv = (ft_model - base_model).filter(include, exclude).with_vocab(vocab)
        if int_tensors == "error":
            b, f = base_model.source, ft_model.source
            check_unchanged(
                [
                    NonFloatReader(
                        name, b.tensors[name].reader, b.label, ((f.label, f.tensors[name].reader),)
                    )
                    for name in tv.resolved().skipped_nonfloat
                    if name in b.tensors and name in f.tensors
                ]
            )
    return tv.astype(dtype) if dtype else tv
