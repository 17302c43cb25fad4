"""Batch logic of the served path, free of Triton so it can be tested and benchmarked on its own (the settings a
version loads are in templar.serving.settings, padding in templar.padding).

`preprocess_rows`: wire rows -> right-padded token ids plus per-row status (a bad row never fails its neighbours).
`plan_micro_batches`: group rows of similar length so the scoring model sees little padding.
`score_in_micro_batches`: score the good rows of a batch micro-batch by micro-batch (the entry model, the benchmark);
for the packed CPU scorer, micro-batches of rows in token order by tokens computed
(templar.serving.prefix_packing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from templar import contract
from templar.chat_format import ChatFormat
from templar.conversation import DEFAULT_LIMITS, ConversationError, RowLimits, parse_conversation
from templar.padding import right_pad
from templar.serving.prefix_packing import computed_tokens, plan_packed_micro_batches
from templar.steps import StepReader
from templar.steps import aggregate as aggregate_steps

# Counters the entry model exports on Triton's metrics endpoint (per model): padding waste = 1 - tokens / slots.
METRIC_TOKENS = "templar_scored_tokens_total"  # real tokens scored
METRIC_SLOTS = "templar_computed_token_slots_total"  # rows * longest row, summed over micro-batches
# the packed scorer: tokens of the rows it did not compute because a row beside them had laid out the same prefix;
# its slots are the tokens it computed, so padding waste = 1 - (tokens - shared) / slots
METRIC_SHARED = "templar_prefix_shared_tokens_total"
PACKINGS = ("padded", "prefix")  # how the scoring model takes a micro-batch (contract.PARAM_SCORER_PACKING)


@dataclass
class PreprocessedBatch:
    input_ids: np.ndarray  # [N, L] int64, right-padded with pad_id
    attention_mask: np.ndarray  # [N, L] int64
    status: list[str]
    num_tokens: np.ndarray  # [N] int32; 0 where the row failed
    truncated: np.ndarray  # [N] bool
    text: list[str] | None = None  # rendered text per row, when asked for
    # a process RM's rows (templar.steps): per row the token index of each step tag, and where each step ends in the
    # client's content (empty where the row failed); None for an outcome RM
    step_positions: list[list[int]] | None = None
    step_ends: list[list[int]] | None = None

    @classmethod
    def concatenate(cls, parts: Sequence[PreprocessedBatch]) -> PreprocessedBatch:
        """Batches of rows one after the other, re-padded (with 0, under a 0 mask) to the widest."""
        if len(parts) == 1:  # the usual case: no re-padding copy
            return parts[0]
        width = max(p.input_ids.shape[1] for p in parts)
        widen = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1])))  # noqa: E731
        joined = lambda name: [x for p in parts for x in getattr(p, name)] \
            if all(getattr(p, name) is not None for p in parts) else None  # noqa: E731
        return cls(np.concatenate([widen(p.input_ids) for p in parts]),
                   np.concatenate([widen(p.attention_mask) for p in parts]),
                   [s for p in parts for s in p.status], np.concatenate([p.num_tokens for p in parts]),
                   np.concatenate([p.truncated for p in parts]), joined("text"), joined("step_positions"),
                   joined("step_ends"))


def preprocess_rows(chat_format: ChatFormat, rows: Sequence[bytes | str], *, pad_id: int = 0,
                    want_text: bool = False, limits: RowLimits = DEFAULT_LIMITS,
                    steps: StepReader | None = None) -> PreprocessedBatch:
    """Wire rows -> right-padded token ids and per-row status; with `steps` (a process RM), each row read in the
    PRM's step format, with where its step tags are."""
    ids_per_row: list[list[int]] = []
    status: list[str] = []
    truncated = np.zeros(len(rows), dtype=bool)
    texts: list[str] = []
    positions: list[list[int]] = []
    ends: list[list[int]] = []
    for i, row in enumerate(rows):
        ids: list[int] = []
        text = ""
        positions.append([])
        ends.append([])
        try:
            conversation = parse_conversation(row, limits)
            if steps is None:
                tokenized = chat_format.tokenize(conversation)
            else:
                reading = steps.read(chat_format, conversation)
                tokenized, positions[-1], ends[-1] = reading.tokenized, reading.positions, reading.ends
            ids = tokenized.input_ids
            truncated[i] = tokenized.truncated
            if want_text:
                text = tokenized.text if steps is not None else chat_format.render(conversation)
            status.append(contract.STATUS_OK)
        except ConversationError as exc:
            status.append(contract.error_status(str(exc)))
        except Exception as exc:  # a template or tokenizer bug must still cost only this row
            status.append(contract.error_status(f"internal error while formatting: {type(exc).__name__}: {exc}"))
        ids_per_row.append(ids)
        texts.append(text)
    lengths = np.array([len(ids) for ids in ids_per_row], dtype=np.int32)
    input_ids, attention_mask = right_pad(ids_per_row, pad_id)
    return PreprocessedBatch(input_ids, attention_mask, status, lengths, truncated, texts if want_text else None,
                             positions if steps is not None else None, ends if steps is not None else None)


def plan_micro_batches(lengths: Sequence[int], *, max_rows: int, max_tokens: int,
                       max_padding: float | None = None) -> list[np.ndarray]:
    """Split row indices into batches of similar length.

    Rows are sorted by length; a batch grows while rows * longest <= max_tokens (the padded size the model
    computes), rows <= max_rows and, when `max_padding` is given, while the batch's padding share
    (1 - real tokens / rows * longest) stays <= max_padding. A single row longer than max_tokens still gets a batch
    of its own.
    """
    if max_rows < 1 or max_tokens < 1:
        raise ValueError(f"max_rows and max_tokens must be positive, got {max_rows}, {max_tokens}")
    if max_padding is not None and not 0.0 <= max_padding < 1.0:
        raise ValueError(f"max_padding must be in [0, 1), got {max_padding}")
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")
    batches: list[np.ndarray] = []
    start, real = 0, 0
    for end in range(1, len(order) + 1):
        rows = end - start
        longest = int(lengths[order[end - 1]])  # sorted ascending: the newest row is the longest
        too_big = rows > max_rows or rows * longest > max_tokens
        too_padded = max_padding is not None and rows * longest > 0 and \
            (rows * longest - real - longest) > max_padding * rows * longest
        if rows > 1 and (too_big or too_padded):
            batches.append(order[start : end - 1])
            start, real = end - 1, 0
        real += longest
    if start < len(order):
        batches.append(order[start:])
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[np.ndarray]) -> float:
    """Share of computed token slots that are padding when `batches` are padded to their longest row."""
    lengths = np.asarray(lengths)
    computed = sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
    return 0.0 if computed == 0 else 1.0 - float(lengths.sum()) / computed


@dataclass
class ScoredBatch:
    scores: np.ndarray  # [N] float32, NaN where the row was not scored
    step_scores: list[np.ndarray] | None  # a process RM's: per row its steps' scores (empty where not scored)
    objectives: np.ndarray | None  # a multi-objective RM's: [N, K] one value per objective, NaN where not scored
    tokens: int  # real tokens scored
    slots: int  # token slots computed: rows * longest row (packed: the tokens computed), summed over micro-batches
    calls: int  # micro-batches scored
    shared: int = 0  # packed: tokens not computed, their prefix computed once for the rows that share it


def _plan(batch: PreprocessedBatch, good: np.ndarray, packing: str, share: bool, **limits) -> list[np.ndarray]:
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
    if packing == "prefix":
        rows = [batch.input_ids[i, : batch.num_tokens[i]] for i in good]
        return [good[part] for part in plan_packed_micro_batches(rows, max_rows=limits["max_rows"],
                                                                 max_tokens=limits["max_tokens"], share=share)]
    return [good[part] for part in plan_micro_batches(batch.num_tokens[good], **limits)]


def score_in_micro_batches(batch: PreprocessedBatch, score: Callable[[np.ndarray, np.ndarray], np.ndarray], *,
                           max_rows: int, max_tokens: int, max_padding: float | None = None,
                           aggregate: str = "min", packing: str = "padded", share_prefixes: bool = True
                           ) -> ScoredBatch:
    """Score the rows whose status is ok with `score(ids, mask) -> [B] or [B, 1]`, in length-sorted micro-batches
    cut to their longest row (`packing="prefix"`, the packed scorer's: rows in token order, up to `max_tokens`
    computed with each shared prefix once). A micro-batch whose `score` raises is scored again row by row, and a row
    that still raises gets the error as its status (in place in `batch.status`): one row a model's own code refuses
    never costs its neighbours. For a process RM's batch, `score` answers [B, L] (the step score at every position):
    each row's steps are read at its tags, its score is their `aggregate`. A multi-objective RM's `score` answers a
    pair: ([B] scores, [B, K] objectives)."""
    scores = np.full(len(batch.status), np.nan, dtype=np.float32)
    process = batch.step_positions is not None
    step_scores = [np.zeros(0, np.float32) for _ in batch.status] if process else None
    objectives = None
    good = np.flatnonzero([contract.is_ok(s) for s in batch.status])
    tokens = slots = calls = shared = 0
    limits = {"max_rows": max_rows, "max_tokens": max_tokens}
    parts = _plan(batch, good, packing, share_prefixes, **limits, **({} if packing == "prefix" else
                                                                     {"max_padding": max_padding}))
    while parts:
        index = parts.pop(0)
        width = int(batch.num_tokens[index].max())
        try:
            result = score(np.ascontiguousarray(batch.input_ids[index, :width]),
                           np.ascontiguousarray(batch.attention_mask[index, :width]))
        except Exception as exc:  # noqa: BLE001 - becomes these rows' status, never the whole batch's failure
            if len(index) > 1:  # which row was it: each alone
                parts[:0] = [index[i:i + 1] for i in range(len(index))]
                continue
            batch.status[index[0]] = contract.error_status(str(exc))
            continue
        if isinstance(result, tuple):  # a multi-objective RM: (scores, objectives)
            result, values = result
            values = np.asarray(values, dtype=np.float32).reshape(len(index), -1)
            if objectives is None:
                objectives = np.full((len(batch.status), values.shape[1]), np.nan, dtype=np.float32)
            objectives[index] = values
        if process:
            result = np.asarray(result, dtype=np.float32).reshape(len(index), width)
            for row, i in zip(result, index):
                step_scores[i] = row[batch.step_positions[i]]
                scores[i] = aggregate_steps(step_scores[i], aggregate)
        else:
            scores[index] = np.asarray(result, dtype=np.float32).reshape(-1)
        real = int(batch.num_tokens[index].sum())
        computed = computed_tokens([batch.input_ids[i, : batch.num_tokens[i]] for i in index],
                                   share=share_prefixes) if packing == "prefix" else width * len(index)
        tokens, calls = tokens + real, calls + 1
        slots += computed
        shared += max(0, real - computed) if packing == "prefix" else 0
    return ScoredBatch(scores, step_scores, objectives, tokens, slots, calls, shared)
