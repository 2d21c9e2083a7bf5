"""`python -m vhostpy`: the same front door as the `vhostpy` console script."""

from __future__ import annotations

import sys

from vhostpy.cli import main

sys.exit(main())
