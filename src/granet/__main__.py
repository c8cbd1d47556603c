"""``python -m granet``: the same as the ``granet`` command."""

import sys

from granet.cli import main

if __name__ == "__main__":
    sys.exit(main())
