"""The ``streamvec`` command line: thin argument parsing over the Python API."""
