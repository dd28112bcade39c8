"""``python -m jaxpo ...`` is the ``jaxpo`` command."""

import sys

from jaxpo.cli import main

sys.exit(main())
