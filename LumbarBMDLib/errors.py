"""The one exception type of the library.

Every expected failure (bad input, no spine in view, a model file that does not match) raises
:class:`LumbarBMDError` with a sentence a radiologist understands. The command line turns it into a
message and a non-zero exit status; the Slicer module shows it in a dialog.
"""

from __future__ import annotations


class LumbarBMDError(Exception):
    """An expected failure with a message meant for the user (radiologist, annotator, researcher)."""


class ComputationCancelled(LumbarBMDError):
    """The user cancelled a running computation (raised from a progress callback); nothing was changed."""
