"""The wire contract between clients and Templar's Triton models. Keep these names stable: users and load tests
depend on them.

Each model's inputs and outputs are declared ONCE, in the table below (`ENTRY`, `PREPROCESS`, `scorer_signature`):
the config.pbtxt files are rendered from it (templar.export.repository), the Python-backend models read their numpy
dtypes from those configs, and clients build requests and decode responses through templar.wire. Changing the
contract means changing the table and the one place that computes the value.

Entry point `<rm>` (what clients call):
    input  CONVERSATION  TYPE_STRING [1]   UTF-8 JSON {"messages": [...]} per row (see templar.conversation)
    output SCORE         TYPE_FP32   [1]   NaN where the row failed
           STATUS        TYPE_STRING [1]   "ok", or "error: <what is wrong>"
           NUM_TOKENS    TYPE_INT32  [1]   tokens the RM scored (after truncation)
           TRUNCATED     TYPE_BOOL   [1]   the conversation was cut from the start to fit max_length
`<rm>_preprocess` (this RM's template + tokenizer) adds INPUT_IDS / ATTENTION_MASK [-1] and, on request, TEXT.
`<rm>_model` (ONNX, or a TensorRT engine with int32 ids) maps INPUT_IDS, ATTENTION_MASK -> SCORE.

A process RM (templar.steps, `templar export --kind prm`) answers the same four outputs, SCORE being the configured
aggregate of its steps (min, last or mean), and three more, which a client asks for by name (old clients never see
them):
    output STEP_SCORES   TYPE_FP32   [-1]  each step's score; NaN past NUM_STEPS (rows of a request pad to the most)
           NUM_STEPS     TYPE_INT32  [1]   steps read; 0 where the row failed
           STEP_ENDS     TYPE_INT32  [-1]  character offset just past each step in the assistant content the client
                                           sent; -1 past NUM_STEPS
Its `<rm>_preprocess` adds STEP_POSITIONS (the token index of each step tag) and NUM_STEPS, STEP_ENDS; its
`<rm>_model` maps INPUT_IDS, ATTENTION_MASK -> TOKEN_SCORES [-1] (the step score at every position), read at the tags.

A multi-objective RM (`num_labels > 1`: one value per named objective) answers SCORE as the combination of its
objectives (the weights given at export, `--objective-weights`) and, asked for by name:
    output SCORES        TYPE_FP32   [-1]  one value per objective, in the order the `objectives` parameter names
Its `<rm>_model` answers SCORE and SCORES.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

CONVERSATION = "CONVERSATION"
SCORE = "SCORE"
STATUS = "STATUS"
NUM_TOKENS = "NUM_TOKENS"
TRUNCATED = "TRUNCATED"
INPUT_IDS = "INPUT_IDS"
ATTENTION_MASK = "ATTENTION_MASK"
TEXT = "TEXT"  # the exact text the RM's template rendered; only computed when a client asks for it
STEP_SCORES = "STEP_SCORES"
NUM_STEPS = "NUM_STEPS"
STEP_ENDS = "STEP_ENDS"
STEP_POSITIONS = "STEP_POSITIONS"
TOKEN_SCORES = "TOKEN_SCORES"
SCORES = "SCORES"

# The scoring model's config for the embedded CPU server (`configs/embedded.pbtxt`, beside the GPU container's
# config.pbtxt): `templar serve` starts Triton with --model-config-name=embedded
EMBEDDED_CONFIG_NAME = "embedded"
# the RM's own folder inside a scoring model's version folder, for the CPU's torch scorers (the packed scorer, an RM
# served by its own forward)
MODEL_FOLDER = "hf"

STATUS_OK = "ok"
ERROR_PREFIX = "error: "

# Model config parameters (visible to clients through ModelConfig) that identify what an RM is.
PARAM_TEMPLATE_SHA256 = "chat_template_sha256"
PARAM_TOKENIZER_SHA256 = "tokenizer_sha256"
PARAM_MAX_LENGTH = "max_length"
PARAM_SPECIAL_TOKENS = "special_tokens"
PARAM_TEMPLATE_KWARGS = "template_kwargs"
PARAM_SOURCE_MODEL = "source_model"
PARAM_SOURCE_SHA256 = "source_sha256"  # the exported folder's files and the export options that shape serving
PARAM_TEMPLAR_VERSION = "templar_version"
PARAM_WEIGHTS_SHA256 = "weights_sha256"  # the served graph's files (model.onnx and its data)
PARAM_PRECISION = "precision"
# The entry model's own parameter: the dtype of the ids its scoring model takes (int32 for a TensorRT engine)
PARAM_SCORING_IDS_DTYPE = "scoring_ids_dtype"
# Where the score is read (templar.export.scorer.ScorePosition): "last-non-pad" (with the pad id) or "last-token"
PARAM_SCORE_POSITION = "score_position"
PARAM_SCORE_PAD_ID = "score_pad_id"
PARAM_SCORE_POSITION_REASON = "score_position_reason"
# What an RM scores: "outcome" (one score per conversation, the default), "process" (a score per step) or
# "multi-objective" (a value per named objective, and their combination as SCORE)
PARAM_RM_KIND = "rm_kind"
RM_KINDS = ("outcome", "process", "multi-objective")
PARAM_OBJECTIVES = "objectives"  # a multi-objective RM's objective names, as a JSON list
PARAM_OBJECTIVE_WEIGHTS = "objective_weights"  # ... and the weights SCORE combines them with, as a JSON list (null:
# the RM combines them itself, its own forward served: templar.export.own_forward)
PARAM_SCORER_RUNTIME = "scorer_runtime"  # "torch" where `<rm>_model` runs the RM's own forward; unset: ONNX
# the embedded entry's config: "prefix" where `<rm>_model` is the packed CPU scorer (micro-batches of rows in token
# order, shared prefixes computed once), else "padded" (templar.serving.batching)
PARAM_SCORER_PACKING = "scorer_packing"
# the packed CPU scorer's config: how to load the RM's folder as the export did (JSON, packed_scorer.LoadOptions)
PARAM_PACKED_LOAD = "packed_load"
PARAM_STEP_FORMAT = "step_format"  # a process RM's templar.steps.StepFormat, as JSON
PARAM_STEP_TAG_ID = "step_tag_id"
FINGERPRINT_PARAMS = (PARAM_TEMPLATE_SHA256, PARAM_TOKENIZER_SHA256, PARAM_MAX_LENGTH, PARAM_SPECIAL_TOKENS,
                      PARAM_WEIGHTS_SHA256, PARAM_PRECISION, PARAM_SCORE_POSITION, PARAM_SCORE_PAD_ID,
                      PARAM_RM_KIND, PARAM_STEP_FORMAT, PARAM_STEP_TAG_ID, PARAM_OBJECTIVES, PARAM_OBJECTIVE_WEIGHTS)


# -- the table -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataType:
    config: str  # in config.pbtxt, e.g. "TYPE_FP32"
    client: str  # in tritonclient requests and responses, e.g. "FP32"
    numpy: type  # what the arrays hold


DATA_TYPES = {t.config: t for t in (
    DataType("TYPE_STRING", "BYTES", np.object_),
    DataType("TYPE_FP32", "FP32", np.float32),
    DataType("TYPE_INT32", "INT32", np.int32),
    DataType("TYPE_INT64", "INT64", np.int64),
    DataType("TYPE_BOOL", "BOOL", np.bool_),
)}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # a key of DATA_TYPES
    dims: tuple[int, ...]  # per row (every model is batched: max_batch_size > 0)

    @property
    def dtype(self) -> DataType:
        return DATA_TYPES[self.data_type]


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.outputs)

    def output(self, name: str) -> TensorSpec:
        return next(spec for spec in self.outputs if spec.name == name)


_ROW_STRING = (1,)
_CONVERSATION = TensorSpec(CONVERSATION, "TYPE_STRING", _ROW_STRING)
_SCORE = TensorSpec(SCORE, "TYPE_FP32", (1,))
_STATUS = TensorSpec(STATUS, "TYPE_STRING", _ROW_STRING)
_NUM_TOKENS = TensorSpec(NUM_TOKENS, "TYPE_INT32", (1,))
_TRUNCATED = TensorSpec(TRUNCATED, "TYPE_BOOL", (1,))

_NUM_STEPS = TensorSpec(NUM_STEPS, "TYPE_INT32", (1,))
_STEP_ENDS = TensorSpec(STEP_ENDS, "TYPE_INT32", (-1,))
_STEPS = (TensorSpec(STEP_SCORES, "TYPE_FP32", (-1,)), _NUM_STEPS, _STEP_ENDS)  # a process RM's, per row

ENTRY = Signature(inputs=(_CONVERSATION,), outputs=(_SCORE, _STATUS, _NUM_TOKENS, _TRUNCATED))
ENTRY_PROCESS = Signature(inputs=ENTRY.inputs, outputs=(*ENTRY.outputs, *_STEPS))
_SCORES = TensorSpec(SCORES, "TYPE_FP32", (-1,))
ENTRY_OBJECTIVES = Signature(inputs=ENTRY.inputs, outputs=(*ENTRY.outputs, _SCORES))
PREPROCESS = Signature(
    inputs=(_CONVERSATION,),
    outputs=(TensorSpec(INPUT_IDS, "TYPE_INT64", (-1,)), TensorSpec(ATTENTION_MASK, "TYPE_INT64", (-1,)),
             _STATUS, _NUM_TOKENS, _TRUNCATED, TensorSpec(TEXT, "TYPE_STRING", _ROW_STRING)))
PREPROCESS_PROCESS = Signature(inputs=PREPROCESS.inputs, outputs=(
    *PREPROCESS.outputs, TensorSpec(STEP_POSITIONS, "TYPE_INT32", (-1,)), _NUM_STEPS, _STEP_ENDS))


def entry_signature(kind: str = "outcome") -> Signature:
    """`<rm>`: the four outputs of every RM, and a process RM's step outputs or a multi-objective RM's SCORES."""
    return {"process": ENTRY_PROCESS, "multi-objective": ENTRY_OBJECTIVES}.get(kind, ENTRY)


def preprocess_signature(kind: str = "outcome") -> Signature:
    return PREPROCESS_PROCESS if kind == "process" else PREPROCESS


def preprocess_for_scoring(kind: str = "outcome") -> tuple[str, ...]:
    """What the entry model asks `<rm>_preprocess` for (TEXT only when a client asks for the rendered text)."""
    return tuple(name for name in preprocess_signature(kind).output_names if name != TEXT)


PREPROCESS_FOR_SCORING = preprocess_for_scoring()


def scorer_signature(ids_type: str = "TYPE_INT64", kind: str = "outcome") -> Signature:
    """`<rm>_model`: int64 ids for ONNX graphs; a TensorRT engine takes int32 ids. A process RM's answers the step
    score at every position."""
    outputs = {"process": (TensorSpec(TOKEN_SCORES, "TYPE_FP32", (-1,)),),
               "multi-objective": (_SCORE, _SCORES)}.get(kind, (_SCORE,))
    return Signature(inputs=(TensorSpec(INPUT_IDS, ids_type, (-1,)), TensorSpec(ATTENTION_MASK, ids_type, (-1,))),
                     outputs=outputs)


ENTRY_OUTPUTS = ENTRY.output_names  # what a client requests from `<rm>`
ENTRY_PROCESS_OUTPUTS = ENTRY_PROCESS.output_names  # ... from a process RM, its steps included


# -- names and statuses ----------------------------------------------------------------------------------------------
def preprocess_model_name(rm: str) -> str:
    return f"{rm}_preprocess"


def scoring_model_name(rm: str) -> str:
    return f"{rm}_model"


def error_status(message: str) -> str:
    return ERROR_PREFIX + message


def is_ok(status: str) -> bool:
    return status == STATUS_OK


# -- string tensors ----------------------------------------------------------------------------------------------------
def encode_strings(values: Iterable[str | bytes]) -> np.ndarray:
    """[N, 1] object array of UTF-8 bytes: a TYPE_STRING tensor of one string per row."""
    encoded = [v if isinstance(v, bytes) else v.encode("utf-8") for v in values]
    array = np.empty((len(encoded), 1), dtype=np.object_)
    array[:, 0] = encoded
    return array


def decode_strings(array: np.ndarray | Sequence[bytes]) -> list[str]:
    """The rows of a TYPE_STRING tensor as str."""
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(array).reshape(-1)]
