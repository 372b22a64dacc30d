"""The base class of the errors a user can fix (a config value, a missing or damaged file).

The job commands report such errors in one line (``error: ...``) with exit code 2 instead of a
traceback (:func:`smnn.jobs.clean_errors`); an experiment's own error types subclass
:class:`UserError` so that the generic job code needs to know none of them.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """An error caused by the input (config, files), reported without a traceback."""
