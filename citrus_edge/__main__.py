"""`python -m citrus_edge`: the `citrus-edge` command line."""

from citrus_edge.cli import entry

entry()
