"""User-facing errors.

Every error a user can cause (a bad file, an unknown layer, a wrong option) is a
`ConvlensError` whose message is one line saying what was wrong and what to do.
The CLI prints that line and exits; anything else escaping is a bug.
"""


class ConvlensError(Exception):
    """A problem with the user's input, explained in one line."""


class OptionError(ConvlensError):
    """An option value that cannot work (out of range, not a number, unknown name): a
    usage error (the CLI exits with 2)."""


class ModelFileError(ConvlensError):
    """A model or weights file that cannot be read or does not fit the model."""


class UnsupportedLayerError(ConvlensError):
    """A Keras layer type (or option) that convlens cannot import."""


class InvalidLayerError(UnsupportedLayerError):
    """A layer config no valid Keras model has (zero strides, sizes that are not numbers ...)."""


class ItemError(Exception):
    """One item cannot be used (unreadable, not an image, too small ...): the reason.

    Not a `ConvlensError`: the engine marks the item failed with this reason and goes on."""
