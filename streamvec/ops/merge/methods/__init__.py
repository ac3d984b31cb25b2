"""One module per merge method; each defines ``METHOD`` (a :class:`MergeMethod`).

They are listed in :data:`streamvec.ops.merge.registry.METHODS`: adding a method is one module
here and one line there.
"""
