"""Task arithmetic on scikit-learn's handwritten digits, every weight-space edit by streamvec.

Run from the repository root (needs torch and scikit-learn, which streamvec does not):

- ``python -m examples.digits.classic``: negation, addition, analogies and the shared/unique
  decomposition on views of the digits (``docs/tutorial-digits.md``, sections 1-7);
- ``python -m examples.digits.relation``: an analogy with a new label task, where neither
  ``tau_B`` nor ``tau_C`` alone can do it (section 8);
- ``python -m examples.digits.planted``: planted shared structure against a control (section 9);
- ``python -m examples.digits.backdoor``: negating a poisoned vector's unique part (section 10);
- ``python -m examples.digits.transformer``: full, attention-only, MLP-only and linearised
  fine-tuning of a small ViT (``docs/tutorial-transformer.md``).

Modules: ``data`` (views, tasks, splits), ``config``, ``train`` (MLPs, pre-training,
fine-tuning), ``vit`` (the transformer and its linearisation), ``runner`` (checkpoints,
streamvec commands, evaluation), ``report``, ``seeds`` (runs over seeds, spreads). The task
vectors of the classic experiment are what :func:`examples.digits.classic.run_experiment`
leaves under ``OUT/vectors/`` (one Zarr store per view).
"""
