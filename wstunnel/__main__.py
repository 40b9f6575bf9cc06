"""``python -m wstunnel`` and the ``wstunnel`` console script (``wstunnel.__main__:main_entry``).

The entry point lives here, outside ``wstunnel.cli``, so that it runs before the
command line's imports: ``--stdio`` pays them at every ssh (issue 22).
"""

from __future__ import annotations

import gc
import sys
from typing import NoReturn


def main_entry() -> NoReturn:
    """Run the command line and exit with its code."""
    # Importing makes ~50,000 objects and little garbage: no collections until the
    # imports are done (cli.main turns it back on); ~10 ms of each start (issue 22).
    gc.disable()
    from .cli.main import main

    sys.exit(main())


if __name__ == "__main__":
    main_entry()
