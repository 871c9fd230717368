"""``python -m vmsh`` runs the same entry point as the ``vmsh`` console script."""

import sys

from vmsh.cli import main

sys.exit(main())
