"""Small helpers shared by the Python-backend models (import only inside a Triton Python-backend stub)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


def model_config(args: dict[str, Any]) -> dict[str, Any]:
    return json.loads(args["model_config"])


def model_parameters(args: dict[str, Any]) -> dict[str, str]:
    """The `parameters` of a model's config.pbtxt as a plain {key: string_value} dict."""
    return {key: value.get("string_value", "") for key, value in model_config(args).get("parameters", {}).items()}


def output_dtypes(args: dict[str, Any]) -> dict[str, np.dtype]:
    """name -> numpy dtype of every output, read from the model's own config (as Triton's python_backend examples
    do), so the config rendered from templar.contract's table is the one place a type is written."""
    return {output["name"]: np.dtype(pb_utils.triton_string_to_numpy(output["data_type"]))
            for output in model_config(args).get("output", [])}
