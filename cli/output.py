"""What every subcommand prints with: rich's console for tables, and ``fail`` for the one
``error: ...`` line that ends a command a user can fix."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from rich.console import Console


def make_console() -> Console:
    """A rich console; piped output (CI, logs) gets 120 columns instead of rich's 80."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with ``code``.

    Parameters
    ----------
    message : str
        One line saying what is wrong and, where it can, what to do.
    code : int, optional
        The exit code: 2 for a bad command line or config, 1 for a failure at run time.
    """
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
