import sys
from pathlib import Path

# The fake virtio driver (tests/virtio_driver.py) is a test helper, not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
