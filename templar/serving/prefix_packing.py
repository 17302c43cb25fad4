"""Rows packed into one token sequence, every shared prefix laid out (and computed) once: the layout the packed CPU
scorer runs (templar.serving.packed_scorer), and how the entry model groups rows for it.

Rows are sorted by their token ids, so rows that share a prefix sit side by side: the RM template's preamble that
every conversation starts with, and in GRPO/RLOO the prompt that n responses share. Each row's tokens past its
longest common prefix with the row before it are appended as one *node*; the node's *context* is the packed spans
that hold the row's earlier tokens (the shared prefix, wherever it was laid out). A token then attends to its
context and, causally, to its own node's tokens before it: exactly the tokens of its own row before it, so every
token's hidden state is the one it has when its row is scored alone. No padding is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Span = tuple[int, int]  # [start, end) in the packed sequence


@dataclass(frozen=True)
class Node:
    start: int  # this node's tokens: packed[start:end]
    end: int
    context: tuple[Span, ...]  # the packed spans of the row's tokens before this node, in order


@dataclass
class PackedLayout:
    tokens: np.ndarray  # [T] int64: every distinct prefix's tokens once
    positions: np.ndarray  # [T] int64: each token's position in its row (rotary embeddings)
    nodes: list[Node]
    reads: np.ndarray  # [R] the packed index each row's score is read at, in the rows' given order
    read_contexts: list[tuple[Span, ...]]  # per row: the packed spans of its tokens up to and including the read one
    shared: int  # tokens of the rows not computed because an earlier row already laid them out

    @property
    def computed(self) -> int:
        return len(self.tokens)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token rows."""
    n = min(len(a), len(b))
    if n and a[0] != b[0]:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def _truncate(spans: Sequence[Span], length: int) -> tuple[Span, ...]:
    """The spans that hold a row's first `length` tokens."""
    kept: list[Span] = []
    for start, end in spans:
        if length <= 0:
            break
        take = min(end - start, length)
        kept.append((start, start + take))
        length -= take
    return tuple(kept)


def pack_rows(rows: Sequence[Sequence[int]], read_positions: Sequence[int], *, share: bool = True) -> PackedLayout:
    """Lay `rows` out once per distinct prefix (`share=False`: each row whole, one after the other). Row i's score is
    read at its token `read_positions[i]`; `reads[i]` is where that token lands in the packed sequence."""
    if len(rows) != len(read_positions):
        raise ValueError(f"{len(rows)} rows but {len(read_positions)} read positions")
    order = sorted(range(len(rows)), key=lambda i: list(rows[i])) if share else list(range(len(rows)))
    tokens: list[int] = []
    positions: list[int] = []
    nodes: list[Node] = []
    reads = np.zeros(len(rows), dtype=np.int64)
    contexts: list[tuple[Span, ...]] = [()] * len(rows)
    previous: Sequence[int] | None = None
    previous_spans: tuple[Span, ...] = ()
    shared = 0
    for i in order:
        row = list(rows[i])
        if not 0 <= read_positions[i] < len(row):
            raise ValueError(f"row {i} has {len(row)} tokens, its score cannot be read at {read_positions[i]}")
        keep = common_prefix(previous, row) if share and previous is not None else 0
        spans = _truncate(previous_spans, keep)
        if keep < len(row):  # new tokens: one node after the shared ones
            start = len(tokens)
            tokens.extend(row[keep:])
            positions.extend(range(keep, len(row)))
            nodes.append(Node(start, len(tokens), spans))
            spans = (*spans, (start, len(tokens)))
        shared += keep
        contexts[i] = _truncate(spans, read_positions[i] + 1)
        last = contexts[i][-1]
        reads[i] = last[1] - 1
        previous, previous_spans = row, spans
    return PackedLayout(np.asarray(tokens, dtype=np.int64), np.asarray(positions, dtype=np.int64), nodes, reads,
                        contexts, shared)


def plan_packed_micro_batches(rows: Sequence[Sequence[int]], *, max_rows: int, max_tokens: int,
                              share: bool = True) -> list[np.ndarray]:
    """Split row indices into micro-batches for the packed scorer: rows in token order (shared prefixes side by
    side), a micro-batch grows while the tokens it computes (each shared prefix once) stay <= max_tokens and its
    rows <= max_rows. A row longer than max_tokens gets a micro-batch of its own."""
    if max_rows < 1 or max_tokens < 1:
        raise ValueError(f"max_rows and max_tokens must be positive, got {max_rows}, {max_tokens}")
    order = sorted(range(len(rows)), key=lambda i: list(rows[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    computed = 0
    for i in order:
        new = len(rows[i]) - (common_prefix(rows[current[-1]], rows[i]) if share and current else 0)
        if current and (len(current) >= max_rows or computed + new > max_tokens):
            batches.append(current)
            current, computed, new = [], 0, len(rows[i])
        current.append(i)
        computed += new
    if current:
        batches.append(current)
    return [np.asarray(b, dtype=np.int64) for b in batches]


def computed_tokens(rows: Sequence[Sequence[int]], *, share: bool = True) -> int:
    """Tokens a packed micro-batch of `rows` computes (each shared prefix once)."""
    ordered = sorted(list(r) for r in rows) if share else [list(r) for r in rows]
    return sum(len(r) - (common_prefix(ordered[k - 1], r) if share and k else 0) for k, r in enumerate(ordered))
