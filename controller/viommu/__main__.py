import sys

from viommu.cli.main import main

sys.exit(main())
