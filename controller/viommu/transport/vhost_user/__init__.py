"""vhost-user back-end side: wire format (messages) and connection state (connection)."""
