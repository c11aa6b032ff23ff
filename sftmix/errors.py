"""The one error type the CLI turns into a clear message instead of a traceback.

`InputError` means the user can fix it: bad data, a bad option, a missing file. The
CLI prints its message (which names the file, line or id, the field, and what to do)
and exits with status 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """An input or configuration problem; the message says where, what, and what to do."""
