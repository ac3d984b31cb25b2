"""Task arithmetic on scikit-learn's handwritten digits, every weight-space edit by streamvec.

Run from the repository root (needs torch and scikit-learn, which streamvec does not):

- ``python -m examples.digits.classic``: negation, addition, analogies and the shared/unique
  decomposition on views of the digits (``docs/tutorial-digits.md``);

Modules: ``data`` (views, tasks, splits), ``config``, ``train`` (model, pre-training,
fine-tuning), ``runner`` (checkpoints, streamvec commands, evaluation), ``report``.
"""
