"""The exceptions every part of Imagic raises; no torch here, so the CLI can catch them before loading it."""


class ImagicError(ValueError):
    """Bad input or a failed run, with a message that says what to change."""


class ImagicCancelled(RuntimeError):
    """The user cancelled; nothing was returned and nothing was changed."""


class ImagicWarning(UserWarning):
    """A setting that runs but is probably not what the user wants (see ``defaults.finetune_lr_warning``)."""
