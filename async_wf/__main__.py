"""``python -m async_wf``: the ``async-wf`` command, for environments without its script."""

import sys

from async_wf.cli import main

sys.exit(main())
