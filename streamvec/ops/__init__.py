"""Operations, one small module each; :mod:`streamvec.operations` lists them."""
