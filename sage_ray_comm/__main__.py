"""``python -m sage_ray_comm``: the same as the ``sage-comm`` command."""

import sys

from .cli import main

sys.exit(main())
