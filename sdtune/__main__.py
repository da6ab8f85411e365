"""``python -m sdtune COMMAND ...`` and ``accelerate launch -m sdtune COMMAND ...``: the ``sdtune`` command."""

import sys

from sdtune.cli import main

sys.exit(main())
