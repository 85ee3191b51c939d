"""``python -m pyvirtio``: the same as the ``pyvirtio`` command."""

import sys

from pyvirtio.cli import main

sys.exit(main())
