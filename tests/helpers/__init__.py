"""Shared test builders (tiny models, data locations) importable as ``tests.helpers``."""
