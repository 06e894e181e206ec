"""``--help`` text shared by every command: each flag's default, said once.

argparse's ArgumentDefaultsHelpFormatter appends ``(default: X)`` to every flag, which prints
``(default: None)`` for a flag whose default is worked out at run time and a second default
after a help that already names its own (``(default: now) (default: None)``). Dependency-free,
like :mod:`training.cli_errors`, so the worker's light CLIs can use it without importing torch.
"""

from __future__ import annotations

import argparse
import re

_NAMES_A_DEFAULT = re.compile(r"\bdefault\b", re.IGNORECASE)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` unless the default is None or the help already says it.

    A list default reads as the words a user would type (``a b``), and an empty one as
    ``none``, instead of Python's ``['a', 'b']`` and ``[]``.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or _NAMES_A_DEFAULT.search(text):
            return text
        if isinstance(action.default, list | tuple) and action.default is not argparse.SUPPRESS:
            shown = " ".join(str(item) for item in action.default) or "none"
            return f"{text} (default: {shown.replace('%', '%%')})"
        return super()._get_help_string(action)
