"""`<rm>`: the entry point clients call (wire contract in templar.contract), a Python-backend BLS model.

Why BLS and not an ensemble: the dynamic batcher only merges requests whose tensors have the same shape, so a
tokenizer that pads each request to its own length would defeat batching in the scoring step. Here the whole dynamic
batch (all rows of all queued requests) is tokenized by `<rm>_preprocess` in one call, rows are sorted by length into
micro-batches with little padding, each micro-batch is scored by `<rm>_model`, and scores go back to their rows.
Rows that failed preprocessing skip the scoring model and keep their error status. Both sub-models are called at
this model's own version (the three models of one export share it), so during a hot swap (`templar reload`) a row is
never tokenized by one export and scored by another.

Where the scoring model is the packed CPU scorer (templar.serving.packed_scorer; the embedded config's
`scorer_packing: prefix`), micro-batches are rows in token order, so rows that share a prefix (the template's
preamble, a GRPO group's prompt) go to the scorer together and their prefix is computed once.

Counters on Triton's metrics endpoint show what batching achieved: `templar_scored_tokens_total` (real tokens
scored), `templar_computed_token_slots_total` (rows * longest row of every micro-batch; packed: the tokens computed)
and `templar_prefix_shared_tokens_total` (packed: tokens whose prefix was computed once for several rows), per model;
padding waste is 1 - (tokens - shared) / slots.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from templar import contract
from templar.serving.batching import (METRIC_SHARED, METRIC_SLOTS, METRIC_TOKENS, PreprocessedBatch,
                                     score_in_micro_batches)
from templar.padding import padded_rows
from templar.serving.settings import EntrySettings, load_step_format, rm_kind
from templar.serving.triton_utils import model_parameters, output_dtypes


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.dtypes = output_dtypes(args)
        self.preprocess_model = contract.preprocess_model_name(args["model_name"])
        self.scoring_model = contract.scoring_model_name(args["model_name"])
        self.version = int(args["model_version"])
        self.settings = EntrySettings.from_parameters(params, "entry")
        labels = {"model": args["model_name"], "version": args["model_version"]}
        # The families must outlive their metrics (the stub says so), hence both are kept on the instance.
        self._metric_families = [
            pb_utils.MetricFamily(name=METRIC_TOKENS, description="real tokens scored by the reward model",
                                  kind=pb_utils.MetricFamily.COUNTER),
            pb_utils.MetricFamily(name=METRIC_SLOTS, kind=pb_utils.MetricFamily.COUNTER,
                                  description="token slots computed (rows * longest row per micro-batch)"),
            pb_utils.MetricFamily(name=METRIC_SHARED, kind=pb_utils.MetricFamily.COUNTER,
                                  description="tokens not computed: their prefix was computed once for several rows"),
        ]
        self.tokens_metric, self.slots_metric, self.shared_metric = (family.Metric(labels=labels)
                                                                     for family in self._metric_families)
        # "prefix": the scoring model is the packed CPU scorer (the embedded config says so); "padded" otherwise
        self.packing = params.get(contract.PARAM_SCORER_PACKING) or "padded"
        # int64 for ONNX graphs; a TensorRT engine in the GPU container takes int32 ids
        self.scoring_ids_dtype = np.dtype(params.get(contract.PARAM_SCORING_IDS_DTYPE, "int64"))
        # a process RM (templar.steps): its scoring model answers the step score at every position, read at the tags
        self.kind = rm_kind(params)
        step_format = load_step_format(params)
        self.aggregate = step_format.aggregate if step_format else "min"
        self.preprocess_outputs = contract.preprocess_for_scoring(self.kind)
        self.score_outputs = contract.scorer_signature(kind=self.kind).output_names
        self.objectives = len(json.loads(params.get(contract.PARAM_OBJECTIVES) or "[]"))

    def execute(self, requests):
        """All rows of all requests of this dynamic batch scored together; a request past max_request_bytes is
        refused alone (its neighbours are scored)."""
        responses: list = [None] * len(requests)
        accepted, rows = [], []
        for i, request in enumerate(requests):
            conversations = pb_utils.get_input_tensor_by_name(request, contract.CONVERSATION).as_numpy().reshape(-1)
            size = sum(len(row) for row in conversations)
            if size > self.settings.max_request_bytes:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"request is {size} bytes of conversations, over the limit of {self.settings.max_request_bytes} "
                    "(max_request_bytes): send fewer or smaller rows per request", pb_utils.TritonError.INVALID_ARG))
                continue
            accepted.append((i, len(conversations)))
            rows.append(conversations)
        if not accepted:
            return responses
        try:
            batch = self._preprocess(np.concatenate(rows))
        except _ModelFailure as exc:
            for i, _ in accepted:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
            return responses
        s = self.settings
        packed = self.packing == "prefix"
        scored = score_in_micro_batches(batch, self._score, max_rows=s.micro_batch_rows,
                                        max_tokens=s.packed_tokens if packed else s.micro_batch_tokens,
                                        max_padding=s.micro_batch_max_padding, aggregate=self.aggregate,
                                        packing=self.packing, share_prefixes=s.prefix_sharing)
        self.tokens_metric.increment(float(scored.tokens))
        self.slots_metric.increment(float(scored.slots))
        self.shared_metric.increment(float(scored.shared))

        start = 0
        for i, count in accepted:
            part = slice(start, start + count)
            start += count
            values = {contract.SCORE: scored.scores[part], contract.STATUS: contract.encode_strings(batch.status[part]),
                      contract.NUM_TOKENS: batch.num_tokens[part], contract.TRUNCATED: batch.truncated[part]}
            values = {name: value.reshape(-1, 1) for name, value in values.items()}
            if scored.step_scores is not None:
                values.update(self._steps(batch, scored, part))
            if self.kind == "multi-objective":  # no row scored: NaN for every objective
                objectives = scored.objectives if scored.objectives is not None else \
                    np.full((len(batch.status), self.objectives), np.nan, np.float32)
                values[contract.SCORES] = objectives[part]
            responses[i] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, value.astype(self.dtypes[name], copy=False)) for name, value in values.items()])
        return responses

    @staticmethod
    def _steps(batch: PreprocessedBatch, scored, part: slice) -> dict[str, np.ndarray]:
        """A process RM's step outputs of one request's rows (a failed row, or one its micro-batch could not score,
        has no steps)."""
        steps = [scores if contract.is_ok(status) else scores[:0]
                 for scores, status in zip(scored.step_scores[part], batch.status[part])]
        ends = [e[: len(s)] for e, s in zip(batch.step_ends[part], steps)]
        return {contract.STEP_SCORES: padded_rows(steps, np.nan, np.float32),
                contract.NUM_STEPS: np.array([[len(s)] for s in steps], dtype=np.int32),
                contract.STEP_ENDS: padded_rows(ends, -1)}

    def _preprocess(self, rows: np.ndarray) -> PreprocessedBatch:
        """Tokenize all rows with the RM's own template (in chunks the preprocess model accepts)."""
        parts = []
        for start in range(0, len(rows), self.settings.max_batch_size):
            chunk = rows[start : start + self.settings.max_batch_size].reshape(-1, 1)
            response = pb_utils.InferenceRequest(
                model_name=self.preprocess_model, model_version=self.version,
                requested_output_names=list(self.preprocess_outputs),
                inputs=[pb_utils.Tensor(contract.CONVERSATION, chunk)],
            ).exec()
            if response.has_error():
                raise _ModelFailure(f"{self.preprocess_model} failed: {response.error().message()}")
            out = {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy()
                   for name in self.preprocess_outputs}
            steps = {}
            if self.kind == "process":
                counts = out[contract.NUM_STEPS].reshape(-1)
                steps = {"step_positions": [row[:n].tolist() for row, n in zip(out[contract.STEP_POSITIONS], counts)],
                         "step_ends": [row[:n].tolist() for row, n in zip(out[contract.STEP_ENDS], counts)]}
            parts.append(PreprocessedBatch(
                input_ids=out[contract.INPUT_IDS], attention_mask=out[contract.ATTENTION_MASK],
                status=contract.decode_strings(out[contract.STATUS]),
                num_tokens=out[contract.NUM_TOKENS].reshape(-1), truncated=out[contract.TRUNCATED].reshape(-1),
                **steps))
        return PreprocessedBatch.concatenate(parts)

    def _score(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """One micro-batch on the scoring model; raising makes the error these rows' status."""
        response = pb_utils.InferenceRequest(
            model_name=self.scoring_model, model_version=self.version,
            requested_output_names=list(self.score_outputs),
            inputs=[pb_utils.Tensor(contract.INPUT_IDS, ids.astype(self.scoring_ids_dtype, copy=False)),
                    pb_utils.Tensor(contract.ATTENTION_MASK, mask.astype(self.scoring_ids_dtype, copy=False))],
        ).exec()
        if response.has_error():
            raise _ModelFailure(f"{self.scoring_model} failed: {response.error().message()}")
        values = tuple(pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self.score_outputs)
        return values if len(values) > 1 else values[0]

    def finalize(self):
        self.tokens_metric = self.slots_metric = self.shared_metric = None  # metrics before their families
        self._metric_families = []


class _ModelFailure(RuntimeError):
    pass
