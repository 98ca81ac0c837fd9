"""viommu: an out-of-process virtio-iommu for QEMU with a Python control plane."""

__version__ = "0.1.0"
