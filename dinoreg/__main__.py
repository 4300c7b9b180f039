"""``python -m dinoreg`` is the ``dinoreg`` command."""

import sys

from dinoreg.cli import main

sys.exit(main())
