"""Who may connect and where to: tokens, destination policy, TLS, trusted proxies."""
