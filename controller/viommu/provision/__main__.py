"""`python -m viommu.provision`: the set-up the checkout's ./scripts/setup runs before the
command line is installed; `viommu setup` is the same."""

import sys

from viommu.provision.setup_cli import main

sys.exit(main())
