"""Experiments that show streamvec's edits behaving as the task-arithmetic papers report.

Each module is runnable (``python -m streamvec.experiments.<name>``) and documented as a
tutorial under ``docs/``. They need extra packages (torch, scikit-learn) that streamvec itself
does not depend on.
"""
