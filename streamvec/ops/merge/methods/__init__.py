"""One module per merge method; each defines ``METHOD`` (a :class:`MergeMethod`).

They are entries of the one operations table, :data:`streamvec.ops.registry.OPERATIONS`:
adding a method is one module here and one line there.
"""
