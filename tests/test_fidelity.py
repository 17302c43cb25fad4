"""Fidelity (issue 20): a served score equals the RM's OWN forward pass on its own template, for every template quirk
times every architecture the export accepts, and a score does not depend on the batch it arrives in.

The reference is never Templar's code: for a `*ForSequenceClassification` it is the untouched Hugging Face model,
`rm(**tok.apply_chat_template(conversation, return_dict=True, return_tensors="pt")).logits[0][0]` (the model card's
snippet); for an OpenRLHF value-head RM, OpenRLHF's reading (the value head at the last attention-mask position,
normalised by the mean/std in config.json).

The matrix (template quirk x architecture) runs both CPU scoring paths in process: the RM's template and guards
(`ChatFormat`, `preprocess_rows`), then length-sorted micro-batches (`score_in_micro_batches`) on ONNX Runtime
(`create_session`, `run_scores`) with the graph the export traces (`choose_score_position`, `trace_to_onnx`), and
packed micro-batches on the packed torch scorer (`PackedScorer`, the default CPU runtime), which is what the three
Triton models run. That this in-process path IS the served path, bit for bit, is checked over real gRPC on the
repository of every fetched family (`test_the_in_process_path_is_the_served_path`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from templar import contract
from templar.chat_format import ChatFormat
from templar.conversation import conversation_rows
from templar.export.scorer import choose_score_position, load_reward_model, parity_error, trace_to_onnx
from templar.reward_client import RewardClient, RewardClientConfig
from templar.samples import sample_conversations
from templar.padding import right_pad
from templar.serving.batching import preprocess_rows, score_in_micro_batches
from templar.serving.settings import load_chat_format, padding_id, version_parameters
from templar.serving.onnx_runtime import create_session, run_scores
from templar.serving.packed_scorer import PackedScorer, create_packed_scorer
from templar.serving.settings import EntrySettings
from templar.tiny_models import TinySize, build_tiny_model

from conftest import FAMILIES

FP32_BOUND = 1e-5  # |served - reference| / max(1, |reference|), the README's Fidelity guarantee for fp32
SIZE = TinySize(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, sliding_window=16)
# every architecture the export accepts (value-head: OpenRLHF's layout on a Llama backbone)
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "mistral", "phi3", "olmo2", "value-head")
ZEPHYR = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def conversations() -> dict[str, list[dict]]:
    cases = sample_conversations(long_words=150)
    cases = {name: cases[name] for name in ("single_turn", "multi_turn", "system_prompt", "unicode", "long")}
    cases["thinking"] = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "<think>\nThree and three.\n</think>\n\n6"}]
    return cases


@dataclass(frozen=True)
class Quirk:
    family: str  # the real tokenizer
    template: str | None  # None: the tokenizer's own chat template (`own_chat_template`)
    cases: tuple[str, ...]  # conversations() that show the quirk


def _ids(tokenizer, template, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=False))


def _text(tokenizer, template, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


def _ends_with_eos_equal_pad(tok, template, cases):
    for messages in cases.values():
        assert _ids(tok, template, messages)[-1] == tok.eos_token_id  # pad = EOS on the tiny RM (no pad token)


def _ends_with_eos_then_newline(tok, template, cases):
    for messages in cases.values():
        ids = _ids(tok, template, messages)
        assert ids[-2] == tok.eos_token_id and tok.decode(ids[-1:]) == "\n"


def _eos_is_not_pad(tok, template, cases):
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    for messages in cases.values():
        assert _ids(tok, template, messages)[-2] == tok.eos_token_id


def _bos_by_template_and_tokenizer(tok, template, cases):
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds a BOS to plain text ...
    for messages in cases.values():
        ids = _ids(tok, template, messages)  # ... and the template writes one: still exactly one
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def _system_folded_into_the_first_user_turn(tok, template, cases):
    text = _text(tok, template, cases["system_prompt"])
    system = cases["system_prompt"][0]["content"]
    assert "system" not in text.split(system)[0].replace("<start_of_turn>user", "") and \
        text.index("<start_of_turn>user") < text.index(system)


def _default_system_prompt(tok, template, cases):
    assert "You are Qwen, created by Alibaba Cloud" in _text(tok, template, cases["single_turn"])


def _thinking_blocks(tok, template, cases):
    text = _text(tok, template, cases["thinking"])
    assert "Two and two." not in text and "Three and three." in text  # earlier turns' reasoning dropped


def _generation_prompt_is_not_the_assistant_prefix(tok, template, cases):
    messages = cases["single_turn"]
    prompt = _text(tok, template, messages[:-1], add_generation_prompt=True)
    full = _text(tok, template, messages)
    assert full.startswith(prompt) and full[len(prompt):].startswith("<think>\n\n</think>\n\n")


QUIRKS = {
    "ends_with_eos_equal_pad": (Quirk("llama3_1", None, ("single_turn", "multi_turn", "long")),
                                _ends_with_eos_equal_pad),
    "ends_with_eos_then_newline": (Quirk("llama3_1", ZEPHYR, ("single_turn", "system_prompt", "unicode")),
                                   _ends_with_eos_then_newline),
    "eos_is_not_pad": (Quirk("qwen2_5", None, ("multi_turn", "unicode")), _eos_is_not_pad),
    "bos_by_template_and_tokenizer": (Quirk("llama3_1", None, ("single_turn", "system_prompt")),
                                      _bos_by_template_and_tokenizer),
    "system_folded_into_the_first_user_turn": (Quirk("gemma3", None, ("system_prompt", "multi_turn")),
                                               _system_folded_into_the_first_user_turn),
    "default_system_prompt": (Quirk("qwen2_5", None, ("single_turn", "long")), _default_system_prompt),
    "thinking_blocks": (Quirk("qwen3", None, ("thinking", "multi_turn")), _thinking_blocks),
    "generation_prompt_is_not_the_assistant_prefix": (Quirk("qwen3", None, ("single_turn", "unicode")),
                                                      _generation_prompt_is_not_the_assistant_prefix),
}


@functools.cache
def tokenizer(family: str):
    """One tokenizer per family (large ones take seconds to load). ChatFormat sets the template it is given on it, so
    every call here names its template explicitly (`own_template` for the tokenizer's own)."""
    from templar.assets import tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(family)), local_files_only=True)
    tok.own_chat_template = tok.chat_template
    return tok


@dataclass
class Graph:
    folder: Path
    session: object
    pad_id: int | None  # where the graph reads: the last token that is not this id
    packed: PackedScorer  # the same folder in the packed torch scorer (uncompiled, as the tests serve it)


@pytest.fixture(scope="module")
def graphs(assets, tmp_path_factory):
    """(tokenizer family, architecture) -> a tiny RM of that architecture on that real tokenizer, traced to ONNX
    as the export traces it. Built on first use; the pairs of the last two families are kept (all 36 pairs held
    ~3 GB in the test process, an ONNX session and a torch copy each, when the suite's memory peaks)."""
    root = tmp_path_factory.mktemp("fidelity")

    @functools.lru_cache(maxsize=2 * len(ARCHITECTURES))
    def build(family: str, arch: str) -> Graph:
        tok = tokenizer(family)
        kind, backbone = ("value-head-reward", "llama") if arch == "value-head" else ("reward", arch)
        folder = build_tiny_model(family, root / f"{family}-{arch}", kind=kind, backbone=backbone, size=SIZE,
                                  seed=len(arch), tokenizer=tok, save_tokenizer=False)
        loaded = load_reward_model(folder)
        rows = [_ids(tok, tok.own_chat_template, m) for m in conversations().values()]
        position = choose_score_position(loaded, "auto", rows, token_name=tok.convert_ids_to_tokens)
        loaded.scorer.pad_id = position.pad_id
        ids, mask = right_pad(rows[:2], padding_id(tok))
        trace_to_onnx(loaded.scorer, torch.from_numpy(ids), torch.from_numpy(mask), folder / "model.onnx")
        return Graph(folder, create_session(folder / "model.onnx", intra_op_threads=1), position.pad_id,
                     PackedScorer(folder, pad_id=position.pad_id))

    return build


def served_path(chat_format: ChatFormat, scorer, rows: list[bytes], pad_id: int,
                settings: EntrySettings = EntrySettings()) -> np.ndarray:
    """The scores the entry model computes for one dynamic batch of rows: preprocessing with the RM's template, then
    micro-batches on the scoring model (templar.serving.reward_entry's code, without Triton around it): length-sorted
    on an ONNX Runtime session, packed (shared prefixes once) on a PackedScorer."""
    batch = preprocess_rows(chat_format, rows, pad_id=pad_id)
    assert batch.status == ["ok"] * len(rows), batch.status
    packed = isinstance(scorer, PackedScorer)
    score = scorer if packed else (lambda ids, mask: run_scores(scorer, ids, mask))
    scored = score_in_micro_batches(batch, score, max_rows=settings.micro_batch_rows,
                                    max_tokens=settings.packed_tokens if packed else settings.micro_batch_tokens,
                                    max_padding=settings.micro_batch_max_padding,
                                    packing="prefix" if packed else "padded", share_prefixes=settings.prefix_sharing)
    return scored.scores.astype(np.float64)


@contextlib.contextmanager
def served_scorer(repo: Path, name: str):
    """The CPU scoring model of a served RM, loaded in this process from its served files as Triton loads it: the
    packed torch scorer (its embedded config's settings) or an ONNX Runtime session. Its torch threads are this
    process's only while it is in use."""
    from templar.export.repository import read_parameters

    folder = repo / contract.scoring_model_name(name)
    params = read_parameters(folder / "configs" / f"{contract.EMBEDDED_CONFIG_NAME}.pbtxt")
    settings = EntrySettings.from_parameters(params, "scorer")
    threads = torch.get_num_threads()
    try:
        if settings.cpu_runtime == "torch":
            yield create_packed_scorer(folder / "1", params, settings)
        else:
            yield create_session(folder / "1" / "model.onnx", intra_op_threads=1)
    finally:
        torch.set_num_threads(threads)


def own_forward(folder: Path, arch: str, tok, template: str | None, cases: list[list[dict]]) -> np.ndarray:
    """The reference: the untouched HF classifier's forward on apply_chat_template's ids and mask, or OpenRLHF's
    value-head reading."""
    inputs = [tok.apply_chat_template(m, chat_template=template, tokenize=True, return_dict=True,
                                      return_tensors="pt") for m in cases]
    with torch.no_grad():
        if arch != "value-head":
            from transformers import AutoModelForSequenceClassification

            rm = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32).eval()
            return np.array([float(rm(**x).logits[0][0]) for x in inputs])
        return np.array([openrlhf_value_head_reward(folder, x["input_ids"], x["attention_mask"]) for x in inputs])


def openrlhf_value_head_reward(folder: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """OpenRLHF's RewardModel.forward: values = value_head(last_hidden_state), read at the last attention-mask position
    (`eos_indices = mask.size(1) - 1 - mask.long().fliplr().argmax(1)`), then (reward - mean) / std."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    config = json.loads((folder / "config.json").read_text())
    base = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    head = torch.nn.Linear(config["hidden_size"], 1, bias=False)
    head.weight.data = load_file(str(folder / "model.safetensors"))["value_head.weight"].float()
    values = head(base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state).squeeze(-1)
    eos = attention_mask.size(1) - 1 - attention_mask.long().fliplr().argmax(dim=1, keepdim=True)
    reward = values.gather(dim=1, index=eos).squeeze(1)
    return float((reward - config["mean"]) / config["std"])


@pytest.mark.integration  # exports ONNX graphs
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("quirk", QUIRKS)
def test_served_score_is_the_models_own_forward(graphs, quirk, arch):
    spec, shows_the_quirk = QUIRKS[quirk]
    tok = tokenizer(spec.family)
    template = spec.template or tok.own_chat_template
    cases = {name: conversations()[name] for name in spec.cases}
    shows_the_quirk(tok, template, cases)  # the cell really has its quirk
    graph = graphs(spec.family, arch)
    chat = ChatFormat(tok, chat_template=template)
    reference = own_forward(graph.folder, arch, tok, template, list(cases.values()))
    for runtime, scorer in (("onnxruntime", graph.session), ("packed torch", graph.packed)):
        served = served_path(chat, scorer, conversation_rows(list(cases.values())), padding_id(tok))
        error = parity_error(served, reference)
        assert error.max() <= FP32_BOUND, \
            f"{quirk} x {arch} on {runtime}: {error.max():.2e} (served {served}, own {reference})"
        assert np.ptp(served) > 1e-4  # different conversations, different scores: nothing constant is compared


def test_the_in_process_path_is_the_served_path(triton, served_repo, references):
    """The matrix's in-process path, run on each served RM's own exported files (its tokenizer folder and
    serving.json, its scoring model's files and settings), gives bit for bit what Triton serves over gRPC; and both
    equal the model's own forward within the fp32 bound. The RMs run the packed torch scorer; rm_qwen2_5_ort the
    ONNX graph."""
    cases = list(conversations().values())
    for family in (*FAMILIES, "qwen2_5_ort"):
        name = f"rm_{family}"
        version = served_repo.path / contract.preprocess_model_name(name) / "1"
        chat, pad = load_chat_format(version / "tokenizer", version_parameters(version, {}))
        kept = [m for m in cases if preprocess_rows(chat, conversation_rows([m])).status == ["ok"]]
        with served_scorer(served_repo.path, name) as scorer:
            local = served_path(chat, scorer, conversation_rows(kept), pad)
        family = family.removesuffix("_ort")
        with RewardClient(RewardClientConfig(model=name, endpoints=[triton.grpc_url])) as client:
            result = client.score(kept)
        assert result.status == ["ok"] * len(kept)
        assert np.array_equal(result.scores.astype(np.float64), local), family
        own = np.array([references[family].score(m) for m in kept])
        assert parity_error(local, own).max() <= FP32_BOUND, family


# -- a score does not depend on its batch ------------------------------------------------------------------------
@pytest.mark.parametrize("name, bound", [("rm_qwen2_5_ort", 0.0), ("rm_qwen2_5", FP32_BOUND)])
def test_a_score_does_not_depend_on_its_batch(triton, served_repo, name, bound):
    """48 conversations scored alone, all in one request, in shuffled requests the dynamic batcher merges, and beside
    long rows, and in process in every micro-batch split. ONNX Runtime (cpu_runtime onnxruntime): bit-identical
    scores, 48 of 48 each time. The packed torch scorer (the default): within the fp32 bound, relative (its matrix
    products round differently beside other rows and shared prefixes; the measured largest difference is printed)."""
    import concurrent.futures

    base = list(conversations().values())
    rows = [[*m[:-1], {"role": "assistant", "content": m[-1]["content"] + f" ({i})"}] for i in range(8)
            for m in base][:48]
    long_rows = [sample_conversations(long_words=700)["long"]] * 4
    config = RewardClientConfig(model=name, endpoints=[triton.grpc_url], rows_per_request=64, max_in_flight=16)
    with RewardClient(config) as client:
        alone = np.array([client.score([r]).scores[0] for r in rows])
        together = client.score(rows).scores
        order = random.Random(0).sample(range(len(rows)), len(rows))
        chunks = [order[i:i + 5] for i in range(0, len(order), 5)]
        with concurrent.futures.ThreadPoolExecutor(len(chunks)) as pool:  # requests in flight at once: merged
            parts = list(pool.map(lambda idx: (idx, client.score([rows[i] for i in idx]).scores), chunks))
        merged = np.empty(len(rows), dtype=np.float32)
        for idx, scores in parts:
            merged[idx] = scores
        beside_long = client.score([*long_rows[:2], *rows, *long_rows[2:]]).scores[2:-2]
    # every micro-batch split, in process on the served files
    version = served_repo.path / contract.preprocess_model_name(name) / "1"
    chat, pad = load_chat_format(version / "tokenizer", version_parameters(version, {}))
    splits = [EntrySettings(micro_batch_rows=n, micro_batch_tokens=1 << 20, micro_batch_max_padding=0.99,
                            packed_tokens=t) for n, t in ((1, 1 << 20), (2, 64), (3, 300), (7, 1 << 20),
                                                          (16, 2048), (48, 1 << 20))]
    with served_scorer(served_repo.path, name) as scorer:
        split = {f"micro-batches of {s.micro_batch_rows} rows": served_path(chat, scorer, conversation_rows(rows),
                                                                           pad, s).astype(np.float32)
                 for s in splits}
    worst = 0.0
    for what, scores in {"in one request": together, "merged": merged, "beside long rows": beside_long,
                         **split}.items():
        error = parity_error(scores, alone)
        worst = max(worst, float(error.max()))
        assert error.max() <= bound, f"{what}: {int((alone != scores).sum())} of 48 differ, by up to {error.max()}"
    print(f"{name}: largest |batched - alone| / max(1, |alone|) = {worst:.2e}")


def test_templar_check_compares_the_served_rm_with_its_own_forward(triton, served_repo, tiny_rms, tmp_path):
    cases = conversations()
    rows = [{"messages": m} for m in cases.values()]
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x<|eot_id|>y"}]})
    rows.append({"text": "<|begin_of_text|>plain text, read by the RM's tokenizer as it is"})
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def check(model: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "templar.cli", "check", "--model", str(model), "--name",
                               "rm_llama3_1", "--url", triton.grpc_url, "--data", str(data), *extra],
                              capture_output=True, text=True, timeout=600)

    ok = check(served_repo.models["rm_llama3_1"], "--out", str(tmp_path / "check.json"))
    assert ok.returncode == 0, ok.stderr[-2000:]
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["compared"] == len(rows) - 1 and report["max_relative_diff"] <= FP32_BOUND
    assert "control-token strings" in report["not_compared"][str(len(rows) - 2)]
    assert "(score position last-non-pad)" in ok.stderr and "0 over" in ok.stderr
    # another RM's weights behind the same name: the check fails and says by how much
    other = build_tiny_model("llama3_1", tmp_path / "other", seed=99)
    bad = check(other)
    assert bad.returncode == 1 and "largest |served - own|" in bad.stderr and " 0 over" not in bad.stderr
    # another template than the one served: refused before any comparison
    wrong = check(tiny_rms["llama3_2"])
    assert wrong.returncode == 2 and "serves another chat template" in wrong.stderr
