"""Batch logic of the served path, free of Triton so it can be tested and benchmarked on its own.

`preprocess_rows`: wire rows -> right-padded token ids plus per-row status (a bad row never fails its neighbours).
`plan_micro_batches`: group rows of similar length so the scoring model sees little padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from templar import contract
from templar.chat_format import ChatFormat
from templar.conversation import ConversationError, parse_conversation


@dataclass
class PreprocessedBatch:
    input_ids: np.ndarray  # [N, L] int64, right-padded with pad_id
    attention_mask: np.ndarray  # [N, L] int64
    status: list[str]
    num_tokens: np.ndarray  # [N] int32; 0 where the row failed
    truncated: np.ndarray  # [N] bool
    text: list[str] | None = None  # rendered text per row, when asked for


def preprocess_rows(chat_format: ChatFormat, rows: Sequence[bytes | str], *, pad_id: int = 0,
                    want_text: bool = False) -> PreprocessedBatch:
    ids_per_row: list[list[int]] = []
    status: list[str] = []
    truncated = np.zeros(len(rows), dtype=bool)
    texts: list[str] = []
    for i, row in enumerate(rows):
        ids: list[int] = []
        text = ""
        try:
            conversation = parse_conversation(row)
            tokenized = chat_format.tokenize(conversation)
            ids = tokenized.input_ids
            truncated[i] = tokenized.truncated
            if want_text:
                text = chat_format.render(conversation)
            status.append(contract.STATUS_OK)
        except ConversationError as exc:
            status.append(contract.error_status(str(exc)))
        except Exception as exc:  # a template or tokenizer bug must still cost only this row
            status.append(contract.error_status(f"internal error while formatting: {type(exc).__name__}: {exc}"))
        ids_per_row.append(ids)
        texts.append(text)
    lengths = np.array([len(ids) for ids in ids_per_row], dtype=np.int32)
    width = max(1, int(lengths.max(initial=0)))
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, ids in enumerate(ids_per_row):
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
    return PreprocessedBatch(input_ids, attention_mask, status, lengths, truncated, texts if want_text else None)


def plan_micro_batches(lengths: Sequence[int], *, max_rows: int, max_tokens: int) -> list[np.ndarray]:
    """Split row indices into batches of similar length.

    Rows are sorted by length; a batch grows while rows * longest <= max_tokens (the padded size the model
    computes) and rows <= max_rows. A single row longer than max_tokens still gets a batch of its own.
    """
    if max_rows < 1 or max_tokens < 1:
        raise ValueError(f"max_rows and max_tokens must be positive, got {max_rows}, {max_tokens}")
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    for end in range(1, len(order) + 1):
        rows = end - start
        longest = int(lengths[order[end - 1]])  # sorted ascending: the newest row is the longest
        if end - start > 1 and (rows > max_rows or rows * longest > max_tokens):
            batches.append(order[start : end - 1])
            start = end - 1
    if start < len(order):
        batches.append(order[start:])
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[np.ndarray]) -> float:
    """Share of computed token slots that are padding when `batches` are padded to their longest row."""
    lengths = np.asarray(lengths)
    computed = sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
    return 0.0 if computed == 0 else 1.0 - float(lengths.sum()) / computed
