"""wstunnel: a multiplexing TCP-over-WebSocket tunnel."""

__version__ = "0.1.0"
