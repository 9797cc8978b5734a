"""``python -m blockgraph``: the same as the ``blockgraph`` command."""

import sys

from blockgraph.tools.main import main

sys.exit(main(["blockgraph", *sys.argv[1:]]))
