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


def scoring_responses(requests, score, dtypes: dict[str, np.dtype], runtime: str) -> list:
    """A scoring model's execute(): each request's ids and mask scored by `score(ids, mask)` (an array, or a tuple of
    arrays in the order of the model's outputs), each output cast to its configured type. A request `score` raises on
    (an id outside the vocabulary, a batch a model's own code refuses) gets the error, named after `runtime`; the
    model keeps serving."""
    from templar import contract

    responses = []
    for request in requests:
        ids = pb_utils.get_input_tensor_by_name(request, contract.INPUT_IDS).as_numpy()
        mask = pb_utils.get_input_tensor_by_name(request, contract.ATTENTION_MASK).as_numpy()
        try:
            values = score(ids, mask)
            values = values if isinstance(values, tuple) else (values,)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor(name, value.astype(dtype, copy=False))
                for (name, dtype), value in zip(dtypes.items(), values)]))
        except Exception as exc:  # noqa: BLE001 - becomes this request's error, never the model's end
            responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"{runtime}: {type(exc).__name__}: {exc}")))
    return responses
