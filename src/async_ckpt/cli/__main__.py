"""``python -m async_ckpt.cli``: the ``async-ckpt`` command."""

import sys

from .main import main

sys.exit(main())
