"""`python -m citrus_edge.cli`: the command line."""

import sys

from citrus_edge.cli import entry

entry(sys.argv[1:])
