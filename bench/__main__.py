"""``python -m bench``: the suite of bench/suite.py."""

import sys

from bench.suite import main

# spawned worker processes (Dask's nannies, multiprocessing's spawn) import
# this module again as __mp_main__: they must not run the suite
if __name__ == "__main__":
    sys.exit(main())
