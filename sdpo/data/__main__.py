"""``python -m sdpo.data check FILE...`` (the command itself is sdpo/data/check.py)."""

import sys

from sdpo.data.check import main

sys.exit(main())
