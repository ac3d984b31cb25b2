"""streamvec's Zarr stores: the layout, validation before reading, chunk reads, SVD stores."""
