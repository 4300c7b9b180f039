"""The one base of the errors a user can fix: bad input (a config, a file, an option, a folder, the machine's set-up)
whose message names the problem and the fix in one line.

Every such error class of dinoreg derives from :class:`InputError` (and keeps its older base, ``ValueError`` or
``RuntimeError``, so code that caught those still does). The command line prints an ``InputError`` (and an
``OSError``: a full disk, a missing permission) in one line; anything else is a bug, and Python's traceback shows
where.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(Exception):
    """Bad input the user can fix; the message is one line naming it and the fix."""
