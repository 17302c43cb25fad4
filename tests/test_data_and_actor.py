"""Prompt data kept as messages, and the actor-side helpers (own template, stop tokens, decoding)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from templar.chat_format import ChatFormat
from templar.trainer.actor import cut_at_stop, decode_responses, encode_prompts
from templar.trainer.data import PromptDataError, PromptStream, load_prompts
from templar.trainer.rewards import RunningMoments, reward_conversations

ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]},
    {"prompt": "Name a colour."},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": "c"}], "extra": 1},
]
EXPECTED = [ROWS[0]["messages"], [{"role": "user", "content": "Name a colour."}], ROWS[2]["messages"]]


def test_jsonl_parquet_and_datasets_folders(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert load_prompts(jsonl) == EXPECTED
    table = pa.table({"messages": [r.get("messages") for r in ROWS], "prompt": [r.get("prompt") for r in ROWS]})
    pq.write_table(table, tmp_path / "p.parquet")
    assert load_prompts(tmp_path / "p.parquet") == EXPECTED
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "x"}, {"prompt": "y"}])}).save_to_disk(
        str(tmp_path / "ds"))
    assert load_prompts(tmp_path / "ds") == [[{"role": "user", "content": "x"}], [{"role": "user", "content": "y"}]]
    with pytest.raises(PromptDataError, match="no split 'test'"):
        load_prompts(tmp_path / "ds", split="test")
    assert len(load_prompts(None)) >= 30  # built-in prompts


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "end with a user turn"),
    ({"text": "hello"}, "neither a 'messages' list nor a 'prompt' string"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] has no 'content'"),
    ([1, 2], "expected an object"),
])
def test_rows_that_are_not_conversations_name_the_row(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(PromptDataError, match=f"bad.jsonl row 1: .*{message}"):
        load_prompts(path)


def test_prompt_stream_shards_ranks_and_restores():
    prompts = [[{"role": "user", "content": str(i)}] for i in range(10)]
    ranks = [PromptStream(prompts, seed=3, shuffle=True, rank=r, world_size=2) for r in range(2)]
    first = [s.next_batch(4) for s in ranks]
    contents = [m[0]["content"] for batch in first for m in batch]
    assert len(set(contents)) == 8  # the two ranks see disjoint prompts
    saved = ranks[0].state_dict()
    again = PromptStream(prompts, seed=3, shuffle=True, rank=0, world_size=2)
    again.load_state_dict(saved)
    assert again.next_batch(4) == ranks[0].next_batch(4)  # crosses into the next epoch identically
    assert ranks[0].epoch == 1


def test_actor_prompts_use_the_actor_template_left_padded(assets):
    chat = ChatFormat.from_dir(assets["qwen2_5"])
    ids, mask = encode_prompts(chat, [EXPECTED[1], EXPECTED[0]], pad_id=0)
    text = chat.tokenizer.decode(ids[0][mask[0].bool()])
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    lengths = mask.sum(1)
    assert mask[:, -1].all() and mask[lengths.argmax()].all()
    assert mask[lengths.argmin(), 0] == 0  # the shorter prompt is padded on the left


def test_cut_at_stop_and_decode(assets):
    chat = ChatFormat.from_dir(assets["qwen2_5"])
    stop = chat.stop_token_ids()
    hello = chat.tokenizer.encode("Hello there", add_special_tokens=False)
    im_start = chat.tokenizer.convert_tokens_to_ids("<|im_start|>")
    tokens = torch.tensor([hello + stop + hello, hello + [im_start] + hello])
    ids, mask, ended = cut_at_stop(tokens, stop, pad_id=0)
    n = len(hello)
    assert ended.tolist() == [True, False]
    assert mask[0].tolist() == [1] * (n + 1) + [0] * n and mask[1].all()
    assert (ids[0, n + 1:] == 0).all()
    texts = decode_responses(chat, ids, mask, ended)
    assert texts[0] == "Hello there"  # no stop token
    assert "<|im_start|>" not in texts[1] and texts[1].startswith("Hello there")  # special tokens skipped


def test_reward_conversations_and_running_moments():
    convs = reward_conversations([EXPECTED[0]], ["Sure."])
    assert convs == [{"messages": EXPECTED[0] + [{"role": "assistant", "content": "Sure."}]}]
    moments = RunningMoments()
    data = [torch.randn(7).numpy() * 3 + 1 for _ in range(3)]
    for chunk in data:
        moments.update(len(chunk), chunk.sum(), (chunk**2).sum())
    everything = torch.tensor([x for chunk in data for x in chunk]).numpy()
    assert moments.mean == pytest.approx(everything.mean(), abs=1e-5)
    assert moments.std == pytest.approx(everything.std(), abs=1e-5)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_the_rollout_sampler_draws_from_the_tempered_top_p_distribution(temperature, top_p):
    """The rollout's sampler (inverse CDF, returned as scores whose argmax is the draw) against the distribution
    do_sample=True draws from: softmax(logits / T), renormalised over the top-p set."""
    from templar.trainer.actor import CategoricalSampler

    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    sampler = CategoricalSampler(temperature, top_p)
    draws = torch.cat([sampler(None, logits.expand(1000, 5)).argmax(-1) for _ in range(40)])
    observed = torch.bincount(draws, minlength=5).double() / len(draws)
    expected = torch.softmax(logits[0].double() / temperature, -1)
    ordered, order = expected.sort(descending=True)
    kept = order[(ordered.cumsum(0) - ordered) < top_p]  # the smallest set of tokens reaching top_p
    expected = torch.zeros_like(expected).index_copy(0, kept, expected[kept])
    expected /= expected.sum()
    assert (observed - expected).abs().max().item() < 0.01, (observed.tolist(), expected.tolist())
    assert observed[expected == 0].sum().item() == 0  # nothing outside the top-p set, ever
