"""The guest-image recipe, shipped as package data (viommu.guest_images): the initramfs's
`init` and `profile`, the modules it loads (`modules.txt`), and the static C guest tools
(`tools/`). viommu.provision.initramfs builds an image from it for each kernel."""
