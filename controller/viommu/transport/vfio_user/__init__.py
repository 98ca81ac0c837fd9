"""vfio-user server side (QEMU docs/interop/vfio-user.rst): wire format (messages), client
memory (dma), one client connection (connection) and the listening socket (server)."""
