"""``python -m adabatch.cli`` runs the ``adabatch`` command."""

import sys

from adabatch.cli import main

sys.exit(main())
