"""Block arithmetic: the kernels (numpy, torch), devices, finite checks, linalg."""
