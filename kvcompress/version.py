"""The package version: one place, which the package, provenance records and saved caches read."""

__version__ = "0.1.0"
