"""The backend's control commands (QMP wire protocol, viommu.transport.control), in groups
by what they touch. Each group takes the parts it needs and registers its commands."""
