"""The ``async-ckpt`` command.

Each subcommand is a ``cmd_<name>(args) -> int`` run by ``main`` in the calling process; none of
them takes part in a training job. ``main`` (argument parser, logging, dispatch) calls into one
module per family: ``state`` (``list``, ``inspect``, ``verify``, ``clean``), ``export``
(``export``), ``bench`` (``bench``) and ``ctl`` (``ctl``, which leaves a request for a running
trainer in its output directory: docs/stopping.md). ``common`` holds ``CliError`` and the output
helpers they share. Exit codes: 0 success; 1 a damaged checkpoint or an expected error (one
message on stderr, no traceback); 2 bad usage (argparse); 130 interrupted.

The console script ``async-ckpt`` and ``python -m async_ckpt.cli`` both run ``main``.
"""

from .main import main

__all__ = ["main"]
