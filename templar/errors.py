"""One error tree. Every error a user can cause (a bad config, bad data, a model that cannot be exported, a missing
asset, a server that cannot be reached) is a TemplarError whose message says what is wrong and what to do;
`templar/cli.py` handles them once: one line `templar CMD: error: ...` and exit code 2, never a traceback.

    TemplarError
    ├── ConfigError                  a configuration key, value, option or model path
    │   └── MissingChatTemplateError     a tokenizer folder without a chat template (templar.chat_format)
    ├── DataError                    input data: prompt files, conversation files, wire rows
    │   ├── ConversationError            a wire row that is not a conversation (templar.conversation)
    │   ├── TemplateParseError           text the actor's template did not render (templar.template_parser)
    │   ├── PromptDataError              a prompt row of the training data (templar.trainer.data)
    │   └── WorkloadError                a conversation file of the load tools (templar.tools.workload)
    ├── ExportError                  a reward model that cannot be exported
    │   ├── TensorRTUnavailable          TensorRT or its GPU missing (templar.export.tensorrt)
    │   └── PackedScorerUnsupported      a model the packed CPU scorer cannot run (templar.serving.packed_scorer)
    ├── AssetError                   a tokenizer or template that cannot be fetched or verified
    ├── ServingError                 a reward server that cannot start or be reached
    │   ├── ServerError                  the embedded server (templar.server.embedded)
    │   ├── RewardServerError            no endpoint answers (templar.reward_client)
    │   │   └── FingerprintMismatchError     endpoints serving different RMs, or not the one expected
    │   └── TransportError               a call a transport could not complete, with its gRPC status name (templar.wire)
    ├── CheckpointError              a training checkpoint that cannot be written (a full disk) or is not complete
    ├── RowsFailed                   OpenRLHF rows that could not be scored, with no failed_reward (integrations)
    ├── LoadTestError                `templar loadtest` cannot run (templar.tools.loadtest)
    └── BenchError                   `templar bench` cannot run (templar.tools.bench.serving)

Every class lives here, where a reader looks for the tree; the modules that raise them import them from here (and so
still offer them under their old names, e.g. `templar.reward_client.RewardServerError`).
"""

from __future__ import annotations


class TemplarError(Exception):
    """Base of every error reported to a user; the message names what is wrong."""


class ConfigError(TemplarError, ValueError):
    """A configuration key or value is wrong; the message names it."""


class MissingChatTemplateError(ConfigError):
    """The tokenizer folder has no chat template and none was given."""


class DataError(TemplarError, ValueError):
    """Input data is not what it must be; the message names the file and row, or the field."""


class ConversationError(DataError):
    """A row that is not a well-formed conversation; the message says what is wrong."""


class TemplateParseError(DataError):
    """The text is not something the actor's template renders; the message says what did not match."""


class PromptDataError(DataError):
    """A prompt row is not a conversation; the message names the row."""


class WorkloadError(DataError):
    """The conversation file cannot be used; the message names the file and the row."""


class ExportError(TemplarError, RuntimeError):
    """The model cannot be exported; the message says why and what to do."""


class TensorRTUnavailable(ExportError):
    """TensorRT (or a CUDA GPU for it) is missing; the message says what to install."""


class PackedScorerUnsupported(ExportError):
    """The model's code does not run through transformers' attention interface, or asks it for something the packed
    CPU scorer does not compute; the export serves it with ONNX Runtime instead and says why."""


class AssetError(TemplarError, RuntimeError):
    """A download failed, a checksum did not match, or an asset is missing."""


class ServingError(TemplarError, RuntimeError):
    """A reward server could not start, stopped unexpectedly, or cannot be reached."""


class ServerError(ServingError):
    """The embedded server could not start or stopped unexpectedly; the message says why."""


class RewardServerError(ServingError):
    """No endpoint could be reached."""


class FingerprintMismatchError(RewardServerError):
    """Endpoints serve different RMs under one name, or not the RM the caller expects."""


class TransportError(ServingError):
    """A call a reward-client transport could not complete (templar.wire.Transport), with the gRPC status name of
    what happened: UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED are retried by the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code  # e.g. "UNAVAILABLE" (an HTTP transport maps 503 to it, 429 to RESOURCE_EXHAUSTED)
        self.message = message


class CheckpointError(TemplarError, RuntimeError):
    """A checkpoint could not be written (the previous one is left intact) or is not complete; the message names the
    folder and says why."""


class RowsFailed(TemplarError):
    """Rows that could not be parsed or scored, and no failed_reward to give them."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable  # the reward server could not score (worth retrying), vs rows that cannot parse


class LoadTestError(TemplarError):
    """The load test cannot run; the message says why."""


class BenchError(TemplarError):
    """The benchmark cannot run; the message says why."""
