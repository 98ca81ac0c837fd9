# Translation engine (stage 1 + stage 2, IOTLB); included into dataplane.pyx so it can use
# GuestMemory's C-level accessors. Filled in by the nested-translation work.
