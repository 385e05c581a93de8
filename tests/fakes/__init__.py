"""Fake services the test suite starts on loopback (no network, real clients)."""
