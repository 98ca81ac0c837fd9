"""`python -m viommu.backend`: the backend process, as launchers start it (see cli.py)."""

import sys

from viommu.backend.cli import main

sys.exit(main())
