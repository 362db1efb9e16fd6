"""citrus-edge: Citrus-V at the edge. Importing this package imports nothing heavy."""

__version__ = "0.1.0"
