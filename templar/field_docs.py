"""The documentation of a dataclass's fields, read from its source: the comment on a field's line (or the comment
lines right above it). Configuration dataclasses document their defaults that way (TRL's and OpenRLHF's style), and
the command lines print it (`templar train --help-config`, the client flags' help) so the docs never drift from the
code."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
from typing import Any


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """field name -> its comment ("" when it has none). Works for any dataclass whose source is available; a field a
    subclass inherits keeps its base class's comment unless the subclass redefines it with one of its own."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update({name: doc for name, doc in _own_field_docs(klass).items() if doc})
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


def _own_field_docs(cls: type) -> dict[str, str]:
    """The comments of the fields `cls` itself defines (in its own class body)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}  # line -> comment text
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(token.start[0])
    docs: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = node.lineno
            doc = [comments[end] for end in range(line, node.end_lineno + 1) if end in comments]
            above, before = [], line - 1
            while before in comments and before not in code_lines:  # a comment block right above the field
                above.insert(0, comments[before])
                before -= 1
            docs[node.target.id] = " ".join(above + doc)
    return docs


def type_name(annotation: Any) -> str:
    """A field's type as written (`str | None`, `list[RewardModelConfig]`)."""
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
