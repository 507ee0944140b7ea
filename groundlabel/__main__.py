"""``python -m groundlabel VERB ...`` (what cluster jobs run)."""

import sys

from groundlabel.cli import main

sys.exit(main())
