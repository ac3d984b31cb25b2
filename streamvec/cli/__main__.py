"""``python -m streamvec.cli``: the same as the ``streamvec`` command."""

import sys

from streamvec.cli.main import main

sys.exit(main())
