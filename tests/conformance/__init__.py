"""Autobahn conformance peers and runner for wstunnel.ws (test tools, not product)."""
