"""Small helpers shared by the Python-backend models (import only inside a Triton Python-backend stub)."""

from __future__ import annotations

import json
from typing import Any


def model_parameters(args: dict[str, Any]) -> dict[str, str]:
    """The `parameters` of a model's config.pbtxt as a plain {key: string_value} dict."""
    config = json.loads(args["model_config"])
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def max_batch_size(args: dict[str, Any]) -> int:
    return int(json.loads(args["model_config"]).get("max_batch_size", 0))
