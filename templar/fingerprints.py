"""Fingerprints: sha256 digests that identify what is served (a template, a tokenizer folder, files), recorded at
export and checked at load, at connect and before re-exporting."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# Files that define a tokenizer; the chat template is fingerprinted on its own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in blocks (weights files can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_tokenizer_dir(path: str | os.PathLike) -> str:
    """sha256 over the tokenizer-defining files of a folder (names and contents), chat template excluded."""
    path = Path(path)
    digest = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        file = path / name
        if file.is_file():
            found = True
            data = file.read_bytes()
            if name == "tokenizer_config.json":  # an embedded template is fingerprinted as the template, not here
                config = json.loads(data)
                config.pop("chat_template", None)
                data = json.dumps(config, sort_keys=True).encode()
            digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    if not found:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {path}")
    return digest.hexdigest()
