"""The wire contract is one table (templar/contract.py): every generated config.pbtxt declares exactly the table's
tensors, parsed back with Triton's own model-config schema, and the client side decodes with the table's types."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from templar import contract, wire
from templar.export import repository
from templar.export.repository import EntrySettings, RewardModelEntry


def declared(config_text: str) -> tuple[list, list]:
    config = text_format.Parse(config_text, model_config_pb2.ModelConfig())
    as_rows = lambda tensors: [(t.name, model_config_pb2.DataType.Name(t.data_type), tuple(t.dims))  # noqa: E731
                               for t in tensors]
    return as_rows(config.input), as_rows(config.output)


def table(signature: contract.Signature) -> tuple[list, list]:
    as_rows = lambda specs: [(s.name, s.data_type, s.dims) for s in specs]  # noqa: E731
    return as_rows(signature.inputs), as_rows(signature.outputs)


@pytest.mark.parametrize("tensorrt", [False, True])
def test_every_config_declares_the_tables_tensors(tmp_path, tensorrt):
    entry = RewardModelEntry("rm", tmp_path / "model.onnx", tmp_path, {"max_length": "8"}, EntrySettings(),
                             tensorrt_plan=tmp_path / "model.plan" if tensorrt else None, tensorrt_max_rows=8)
    ids_type = "TYPE_INT32" if tensorrt else "TYPE_INT64"
    assert declared(repository.entry_config(entry)) == table(contract.ENTRY)
    assert declared(repository.preprocess_config(entry)) == table(contract.PREPROCESS)
    assert declared(repository.scorer_config_embedded(entry)) == table(contract.scorer_signature(ids_type))
    gpu = repository.scorer_config_tensorrt(entry) if tensorrt else repository.scorer_config_gpu(entry)
    assert declared(gpu) == table(contract.scorer_signature(ids_type))
    # the entry model casts ids to what its scoring model declares
    params = {k: v.string_value for k, v in text_format.Parse(repository.entry_config(entry),
                                                              model_config_pb2.ModelConfig()).parameters.items()}
    assert np.dtype(params["scoring_ids_dtype"]) == contract.DATA_TYPES[ids_type].numpy


@pytest.mark.parametrize("kind", ["process", "multi-objective"])
def test_the_configs_of_process_and_multi_objective_rms_declare_their_tables(tmp_path, kind):
    """A process RM's three configs and a multi-objective RM's declare what their signatures in the table say: the
    four outputs of every RM first (what old clients ask for), then their own."""
    entry = RewardModelEntry("rm", tmp_path / "model.onnx", tmp_path,
                             {"max_length": "8", contract.PARAM_RM_KIND: kind}, EntrySettings())
    assert declared(repository.entry_config(entry)) == table(contract.entry_signature(kind))
    assert declared(repository.preprocess_config(entry)) == table(contract.preprocess_signature(kind))
    assert declared(repository.scorer_config_embedded(entry)) == table(contract.scorer_signature(kind=kind))
    assert declared(repository.scorer_config_gpu(entry)) == table(contract.scorer_signature(kind=kind))
    assert contract.entry_signature(kind).output_names[:4] == contract.ENTRY_OUTPUTS
    extra = {"process": ("STEP_SCORES", "NUM_STEPS", "STEP_ENDS"), "multi-objective": ("SCORES",)}[kind]
    assert contract.entry_signature(kind).output_names[4:] == extra


def test_the_entry_contract_is_the_documented_one():
    """The names and types users and load tests depend on (README, "The wire contract")."""
    assert table(contract.ENTRY) == (
        [("CONVERSATION", "TYPE_STRING", (1,))],
        [("SCORE", "TYPE_FP32", (1,)), ("STATUS", "TYPE_STRING", (1,)), ("NUM_TOKENS", "TYPE_INT32", (1,)),
         ("TRUNCATED", "TYPE_BOOL", (1,))])
    assert contract.ENTRY_OUTPUTS == ("SCORE", "STATUS", "NUM_TOKENS", "TRUNCATED")


def test_requests_and_responses_use_the_table():
    rows = ['{"messages": []}', "é".encode()]
    (tensor,) = wire.conversation_inputs(rows)
    assert tensor.name() == contract.CONVERSATION and tensor.datatype() == "BYTES" and tensor.shape() == [2, 1]
    encoded = contract.encode_strings(rows)
    assert encoded.shape == (2, 1) and contract.decode_strings(encoded) == ['{"messages": []}', "é"]


def test_model_repository_readme_matches_the_layout():
    text = (Path(__file__).resolve().parents[1] / "model_repository" / "README.md").read_text()
    assert contract.EMBEDDED_CONFIG_NAME == "embedded" and "configs/embedded.pbtxt" in text


def test_the_settings_table_round_trips_through_the_generated_configs(tmp_path):
    """Every knob EntrySettings records is written into its model's config and read back, typed, by
    `from_parameters` (what the three Python models call): no key is written under one name and read under another."""
    settings = EntrySettings(max_batch_size=64, micro_batch_rows=8, micro_batch_tokens=1000,
                             micro_batch_max_padding=None, intra_op_threads=3, intra_op_spinning=True,
                             cpu_precision="bf16", max_row_bytes=999, max_messages=7, max_json_depth=9,
                             max_request_bytes=12345, cpu_runtime="openvino", packed_tokens=777,
                             prefix_sharing=False, packed_compile=False)
    entry = RewardModelEntry("rm", tmp_path / "model.onnx", tmp_path, {"max_length": "8"}, settings)
    configs = {"entry": repository.entry_config(entry), "preprocess": repository.preprocess_config(entry),
               "scorer": repository.scorer_config_embedded(entry)}
    recorded = set()
    for model, text in configs.items():
        params = {k: v.string_value for k, v in text_format.Parse(text, model_config_pb2.ModelConfig())
                  .parameters.items()}
        back = EntrySettings.from_parameters(params, model)
        for key, f in EntrySettings.table(model).items():
            assert key in params, (model, key)
            assert getattr(back, f.name) == getattr(settings, f.name) != getattr(EntrySettings(), f.name), key
            recorded.add(f.name)
    assert recorded == {"max_batch_size", "micro_batch_rows", "micro_batch_tokens", "micro_batch_max_padding",
                        "intra_op_threads", "intra_op_spinning", "cpu_precision", "max_row_bytes", "max_messages",
                        "max_json_depth", "max_request_bytes", "cpu_runtime", "packed_tokens", "prefix_sharing",
                        "packed_compile"}
    assert settings.row_limits.max_messages == 7
    # a config written before a key existed keeps that key's documented default
    assert EntrySettings.from_parameters({}, "entry") == EntrySettings()
