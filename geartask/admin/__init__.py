"""The manager's library: every job server's admin protocol, asked of all servers at once."""
