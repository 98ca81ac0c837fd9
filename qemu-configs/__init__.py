"""Machine profiles, shipped as package data (viommu.qemu_configs): `viommu up NAME` and
`Machine("NAME")` find NAME.toml here (viommu.vm.profile)."""
