"""`<rm>_preprocess`: this RM's own chat template and tokenizer, inside Triton (Python backend).

CONVERSATION rows -> INPUT_IDS / ATTENTION_MASK (right-padded), STATUS, NUM_TOKENS, TRUNCATED and, when asked for, TEXT.
The tokenizer files and the template sit beside the model in `<version>/tokenizer/`, this version's settings and
fingerprints in `<version>/serving.json` (the config's parameters for repositories exported before it); the
fingerprints are checked at load, so a hand-edited template cannot be served under the old fingerprint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

import triton_python_backend_utils as pb_utils

from templar import contract
from templar.fingerprints import fingerprint_tokenizer_dir
from templar.padding import padded_rows
from templar.serving.batching import preprocess_rows
from templar.serving.settings import (SERVING_FILE, EntrySettings, load_chat_format, load_step_reader,
                                     version_parameters)
from templar.serving.triton_utils import model_parameters, output_dtypes


def without_torch() -> None:
    """This process renders templates and tokenizes, nothing more, but `import transformers` imports torch where it
    is installed: ~180 MB and ~2 s of start per preprocessing model (a process each). Marking torch absent before
    transformers loads keeps it at its tokenizers (measured: 70 MB after the import instead of 253 MB)."""
    if "transformers" in sys.modules or "torch" in sys.modules:
        return  # already imported in this process: nothing to save
    sys.modules["torch"] = None  # `import torch` now raises ImportError, which transformers reads as "not installed"
    verbosity = os.environ.get("TRANSFORMERS_VERBOSITY")
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"  # not its "PyTorch was not found" warning in every server log
    try:
        from transformers.utils import logging as hf_logging
    finally:
        if verbosity is None:
            del os.environ["TRANSFORMERS_VERBOSITY"]
        else:
            os.environ["TRANSFORMERS_VERBOSITY"] = verbosity
    hf_logging.set_verbosity(hf_logging.log_levels.get(verbosity or "warning", hf_logging.WARNING))


class TritonPythonModel:
    def initialize(self, args):
        without_torch()
        version_dir = Path(args["model_repository"]) / args["model_version"]
        params = version_parameters(version_dir, model_parameters(args))
        self.dtypes = output_dtypes(args)
        folder = version_dir / "tokenizer"
        self.chat_format, self.pad_id = load_chat_format(folder, params)
        self.limits = EntrySettings.from_parameters(params, "preprocess").row_limits
        self.steps = load_step_reader(self.chat_format, params)  # a process RM's step format, else None
        expected = {contract.PARAM_TEMPLATE_SHA256: self.chat_format.template_sha256,
                    contract.PARAM_TOKENIZER_SHA256: fingerprint_tokenizer_dir(folder)}
        for key, actual in expected.items():
            if params.get(key) != actual:
                recorded = SERVING_FILE if (version_dir / SERVING_FILE).is_file() else "config.pbtxt"
                raise RuntimeError(f"{args['model_name']}: {key} of {folder} is {actual}, but {recorded} records "
                                   f"{params.get(key)}; re-export the model instead of editing it in place")

    def execute(self, requests):
        responses = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, contract.CONVERSATION).as_numpy().reshape(-1)
            want_text = contract.TEXT in request.requested_output_names()
            batch = preprocess_rows(self.chat_format, list(rows), pad_id=self.pad_id, want_text=want_text,
                                    limits=self.limits, steps=self.steps)
            values = {contract.INPUT_IDS: batch.input_ids, contract.ATTENTION_MASK: batch.attention_mask,
                      contract.STATUS: contract.encode_strings(batch.status),
                      contract.NUM_TOKENS: batch.num_tokens.reshape(-1, 1),
                      contract.TRUNCATED: batch.truncated.reshape(-1, 1)}
            if want_text:
                values[contract.TEXT] = contract.encode_strings(batch.text)
            if self.steps is not None:
                values[contract.STEP_POSITIONS] = padded_rows(batch.step_positions, -1)
                values[contract.STEP_ENDS] = padded_rows(batch.step_ends, -1)
                values[contract.NUM_STEPS] = np.array([[len(p)] for p in batch.step_positions], dtype=np.int32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, value.astype(self.dtypes[name], copy=False)) for name, value in values.items()]))
        return responses
