"""`python -m harp.bench --probe SOURCE ...`: the child process of `harp.bench.probe_memory` (internal)."""

import sys

from harp.bench.probe import main

main(sys.argv[1:])
