# What viommu._dataplane shares with Python: the spec headers. Cython exports a `cpdef enum`
# as a Python enum of a module only when the module's own .pxd (this file, found by the
# module's qualified name under ext/) or .pyx declares it, so the headers are included here
# rather than cimported. viommu.uapi and viommu.events.smmuv3 are their Python faces.

include "uapi/virtio_ring.pxd"
include "uapi/virtio_iommu.pxd"
include "uapi/smmuv3.pxd"
include "uapi/virtio_config.pxd"
include "uapi/virtio_pci.pxd"
include "uapi/virtio_blk.pxd"
