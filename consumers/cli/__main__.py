"""``python -m consumers.cli``: the ``ingest`` command without the console script."""

import sys

from consumers.cli import main

sys.exit(main())
