"""One error tree. Every error a user can cause (a bad config, bad data, a model that cannot be exported, a missing
asset, a server that cannot be reached) is a TemplarError whose message says what is wrong and what to do;
`templar/cli.py` handles them once: one line `templar CMD: error: ...` and exit code 2, never a traceback.

    TemplarError
    ├── ConfigError        a configuration key, value, option or model path
    ├── DataError          input data: prompt files, conversation files, wire rows (ConversationError)
    ├── ExportError        a reward model that cannot be exported (TensorRTUnavailable)
    ├── AssetError         a tokenizer or template that cannot be fetched or verified
    ├── ServingError       a reward server that cannot start or be reached (ServerError, RewardServerError)
    └── CheckpointError    a training checkpoint that cannot be written (a full disk) or is not complete
"""

from __future__ import annotations


class TemplarError(Exception):
    """Base of every error reported to a user; the message names what is wrong."""


class ConfigError(TemplarError, ValueError):
    """A configuration key or value is wrong; the message names it."""


class DataError(TemplarError, ValueError):
    """Input data is not what it must be; the message names the file and row, or the field."""


class ExportError(TemplarError, RuntimeError):
    """The model cannot be exported; the message says why and what to do."""


class AssetError(TemplarError, RuntimeError):
    """A download failed, a checksum did not match, or an asset is missing."""


class ServingError(TemplarError, RuntimeError):
    """A reward server could not start, stopped unexpectedly, or cannot be reached."""


class CheckpointError(TemplarError, RuntimeError):
    """A checkpoint could not be written (the previous one is left intact) or is not complete; the message names the
    folder and says why."""
