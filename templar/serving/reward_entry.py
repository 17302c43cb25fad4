"""`<rm>`: the entry point clients call (wire contract in templar.contract), a Python-backend BLS model.

Why BLS and not an ensemble: the dynamic batcher only merges requests whose tensors have the same shape, so a
tokenizer that pads each request to its own length would defeat batching in the scoring step. Here the whole dynamic
batch (all rows of all queued requests) is tokenized by `<rm>_preprocess` in one call, rows are sorted by length into
micro-batches with little padding, each micro-batch is scored by `<rm>_model`, and scores go back to their rows.
Rows that failed preprocessing skip the scoring model and keep their error status.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from templar import contract
from templar.serving.batching import plan_micro_batches
from templar.serving.triton_utils import model_parameters

_PREPROCESS_OUTPUTS = [contract.INPUT_IDS, contract.ATTENTION_MASK, contract.STATUS, contract.NUM_TOKENS,
                       contract.TRUNCATED]


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.preprocess_model = params["preprocess_model"]
        self.scoring_model = params["scoring_model"]
        self.preprocess_max_rows = int(params["preprocess_max_batch_size"])
        self.micro_batch_rows = int(params["micro_batch_rows"])
        self.micro_batch_tokens = int(params["micro_batch_tokens"])
        # int64 for ONNX graphs; a TensorRT engine in the GPU container takes int32 ids
        self.scoring_ids_dtype = np.dtype(params.get("scoring_ids_dtype", "int64"))

    def execute(self, requests):
        row_counts, rows = [], []
        for request in requests:
            conversations = pb_utils.get_input_tensor_by_name(request, contract.CONVERSATION).as_numpy().reshape(-1)
            row_counts.append(len(conversations))
            rows.append(conversations)
        try:
            ids, mask, status, num_tokens, truncated = self._preprocess(np.concatenate(rows))
            scores = self._score(ids, mask, status, num_tokens)
        except _ModelFailure as exc:
            error = pb_utils.TritonError(str(exc))
            return [pb_utils.InferenceResponse(error=error) for _ in requests]

        responses, start = [], 0
        for count in row_counts:
            part = slice(start, start + count)
            start += count
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(contract.SCORE, scores[part].reshape(-1, 1)),
                pb_utils.Tensor(contract.STATUS, np.array([s.encode("utf-8") for s in status[part]],
                                                          dtype=np.object_).reshape(-1, 1)),
                pb_utils.Tensor(contract.NUM_TOKENS, num_tokens[part].reshape(-1, 1)),
                pb_utils.Tensor(contract.TRUNCATED, truncated[part].reshape(-1, 1)),
            ]))
        return responses

    def _preprocess(self, rows: np.ndarray):
        """Tokenize all rows with the RM's own template (in chunks the preprocess model accepts)."""
        parts = []
        for start in range(0, len(rows), self.preprocess_max_rows):
            chunk = rows[start : start + self.preprocess_max_rows].reshape(-1, 1)
            response = pb_utils.InferenceRequest(
                model_name=self.preprocess_model,
                requested_output_names=_PREPROCESS_OUTPUTS,
                inputs=[pb_utils.Tensor(contract.CONVERSATION, chunk)],
            ).exec()
            if response.has_error():
                raise _ModelFailure(f"{self.preprocess_model} failed: {response.error().message()}")
            parts.append([pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in
                          _PREPROCESS_OUTPUTS])
        width = max(p[0].shape[1] for p in parts)
        ids = np.concatenate([np.pad(p[0], ((0, 0), (0, width - p[0].shape[1]))) for p in parts])
        mask = np.concatenate([np.pad(p[1], ((0, 0), (0, width - p[1].shape[1]))) for p in parts])
        status = [s.decode("utf-8") for p in parts for s in p[2].reshape(-1)]
        num_tokens = np.concatenate([p[3].reshape(-1) for p in parts]).astype(np.int32)
        truncated = np.concatenate([p[4].reshape(-1) for p in parts]).astype(bool)
        return ids, mask, status, num_tokens, truncated

    def _score(self, ids: np.ndarray, mask: np.ndarray, status: list[str], num_tokens: np.ndarray) -> np.ndarray:
        """Score the rows that preprocessed cleanly, in length-sorted micro-batches; NaN elsewhere."""
        scores = np.full(len(status), np.nan, dtype=np.float32)
        good = np.flatnonzero([contract.is_ok(s) for s in status])
        for batch in plan_micro_batches(num_tokens[good], max_rows=self.micro_batch_rows,
                                        max_tokens=self.micro_batch_tokens):
            index = good[batch]
            width = int(num_tokens[index].max())
            response = pb_utils.InferenceRequest(
                model_name=self.scoring_model,
                requested_output_names=[contract.SCORE],
                inputs=[pb_utils.Tensor(contract.INPUT_IDS, np.ascontiguousarray(
                            ids[index, :width], dtype=self.scoring_ids_dtype)),
                        pb_utils.Tensor(contract.ATTENTION_MASK, np.ascontiguousarray(
                            mask[index, :width], dtype=self.scoring_ids_dtype))],
            ).exec()
            if response.has_error():
                message = contract.error_status(f"{self.scoring_model} failed: {response.error().message()}")
                for i in index:
                    status[i] = message
                continue
            scores[index] = pb_utils.get_output_tensor_by_name(response, contract.SCORE).as_numpy().reshape(-1)
        return scores


class _ModelFailure(RuntimeError):
    pass
