"""User-facing errors.

Every error a user can cause (a bad file, an unknown layer, a wrong option) is a
`ConvlensError` whose message is one line saying what was wrong and what to do.
The CLI prints that line and exits; anything else escaping is a bug.
"""


class ConvlensError(Exception):
    """A problem with the user's input, explained in one line."""


class ModelFileError(ConvlensError):
    """A model or weights file that cannot be read or does not fit the model."""


class UnsupportedLayerError(ConvlensError):
    """A Keras layer type (or option) that convlens cannot import."""
