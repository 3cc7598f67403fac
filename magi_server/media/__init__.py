"""Media in and out: ``fetch`` (where input bytes come from), ``ffmpeg`` (running the binary), ``images`` and
``video`` (decoding request inputs), ``mp4`` (writing the output). Each module says what it owns.

Every problem with what a caller handed in raises :class:`InputError`, defined here because every module raises it.
"""
from magi_server.params import ParamError


class InputError(ParamError):
    """Bad media input. ``str(err)`` starts with the parameter name, e.g. ``"image: not a PNG, JPEG or WebP image"``."""

    def __init__(self, param: str, message: str):
        super().__init__(param, message, "media_error")
