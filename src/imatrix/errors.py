"""The one exception type for errors a user can cause.

Why a single type: the CLI turns exactly this type into one line on stderr and exit
code 1; anything else is a bug and is allowed to show a traceback. Messages must
name the file, tensor or key at fault.
"""

from __future__ import annotations


class ImatrixError(Exception):
    """A user-caused problem (bad file, bad argument, wrong model), with a clear message."""
