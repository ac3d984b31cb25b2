"""Operations, one small module each; :mod:`streamvec.ops.registry` lists them."""
