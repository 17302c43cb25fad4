"""The wire contract between clients and Templar's Triton models (DESIGN.md §2). Keep these names stable.

Entry point `<rm>` (what clients call):
    input  CONVERSATION  TYPE_STRING [1]   UTF-8 JSON {"messages": [...]} per row (see templar.conversation)
    output SCORE         TYPE_FP32   [1]   NaN where the row failed
           STATUS        TYPE_STRING [1]   "ok", or "error: <what is wrong>"
           NUM_TOKENS    TYPE_INT32  [1]   tokens the RM scored (after truncation)
           TRUNCATED     TYPE_BOOL   [1]   the conversation was cut from the start to fit max_length
`<rm>_preprocess` (this RM's template + tokenizer) adds INPUT_IDS / ATTENTION_MASK [-1] and, on request, TEXT.
`<rm>_model` (ONNX) maps INPUT_IDS, ATTENTION_MASK -> SCORE.
"""

from __future__ import annotations

CONVERSATION = "CONVERSATION"
SCORE = "SCORE"
STATUS = "STATUS"
NUM_TOKENS = "NUM_TOKENS"
TRUNCATED = "TRUNCATED"
INPUT_IDS = "INPUT_IDS"
ATTENTION_MASK = "ATTENTION_MASK"
TEXT = "TEXT"  # the exact text the RM's template rendered; only computed when a client asks for it

ENTRY_OUTPUTS = (SCORE, STATUS, NUM_TOKENS, TRUNCATED)
PREPROCESS_OUTPUTS = (INPUT_IDS, ATTENTION_MASK, STATUS, NUM_TOKENS, TRUNCATED, TEXT)

STATUS_OK = "ok"
ERROR_PREFIX = "error: "

# Model config parameters (visible to clients through ModelConfig) that identify what an RM is.
PARAM_TEMPLATE_SHA256 = "chat_template_sha256"
PARAM_TOKENIZER_SHA256 = "tokenizer_sha256"
PARAM_MAX_LENGTH = "max_length"
PARAM_SPECIAL_TOKENS = "special_tokens"
PARAM_TEMPLATE_KWARGS = "template_kwargs"
PARAM_SOURCE_MODEL = "source_model"
PARAM_TEMPLAR_VERSION = "templar_version"
FINGERPRINT_PARAMS = (PARAM_TEMPLATE_SHA256, PARAM_TOKENIZER_SHA256, PARAM_MAX_LENGTH, PARAM_SPECIAL_TOKENS)


def preprocess_model_name(rm: str) -> str:
    return f"{rm}_preprocess"


def scoring_model_name(rm: str) -> str:
    return f"{rm}_model"


def error_status(message: str) -> str:
    return ERROR_PREFIX + message


def is_ok(status: str) -> bool:
    return status == STATUS_OK
