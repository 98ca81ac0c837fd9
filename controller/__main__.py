import sys

from viommu.cli import main

sys.exit(main())
