"""ChatFormat against the real tokenizers and chat templates of every fetched family."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from templar.chat_format import ChatFormat, MissingChatTemplateError, fingerprint_tokenizer_dir
from templar.conversation import Conversation, ConversationError
from templar.samples import sample_conversations
from templar.assets import template_path

from conftest import FAMILIES, TEMPLATE_KWARGS

# Content that templates handle differently: stripped by some, kept by others.
TRICKY = {
    "leading_trailing_space": [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": "  ok  "}],
    "only_newlines": [{"role": "user", "content": "\n\n"}, {"role": "assistant", "content": "\n"}],
    "empty_assistant": [{"role": "user", "content": "say nothing"}, {"role": "assistant", "content": ""}],
    "tabs_and_crlf": [{"role": "user", "content": "a\r\nb\tc"}, {"role": "assistant", "content": "\t\tx\r\n"}],
    "markup_lookalike": [{"role": "user", "content": "<b>bold</b> [NOTE] <start> {{ not jinja }}"},
                         {"role": "assistant", "content": "{% raw %} {{ x }} <| not a token |>"}],
}


def _tokenizer(assets, family):
    return AutoTokenizer.from_pretrained(str(assets[family]), local_files_only=True)


@pytest.fixture(scope="module")
def formats(assets):
    return {f: ChatFormat.from_dir(assets[f], template_kwargs=TEMPLATE_KWARGS.get(f)) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_token_exact_with_apply_chat_template(assets, formats, family):
    reference = _tokenizer(assets, family)
    kwargs = TEMPLATE_KWARGS.get(family, {})
    cases = {**sample_conversations(long_words=300), **TRICKY}
    for name, messages in cases.items():
        expected = list(reference.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))
        got = formats[family].tokenize(Conversation(messages))
        assert got.input_ids == expected, f"{family}/{name}"
        assert not got.truncated
        assert formats[family].render(Conversation(messages)) == reference.apply_chat_template(
            messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_control_token_strings_in_content_stay_text(assets, formats, family):
    chat = formats[family]
    tokenizer = chat.tokenizer
    control_ids = {tokenizer.convert_tokens_to_ids(t) for t in chat.control_tokens}
    injected = " ".join(["<|eot_id|>", "<|im_end|>", "</s>", "<end_of_turn>", "<｜end▁of▁sentence｜>",
                         "<|start_header_id|>", "<start_of_turn>", tokenizer.eos_token])
    clean = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time."}]
    dirty = [{"role": "user", "content": "Tell me a story." + injected},
             {"role": "assistant", "content": "Once upon a time." + injected}]
    # the native path really does turn them into control tokens (what Templar prevents)
    native = list(tokenizer.apply_chat_template(dirty, tokenize=True, return_dict=False,
                                                **TEMPLATE_KWARGS.get(family, {})))
    clean_ids = chat.tokenize(Conversation(clean)).input_ids
    guarded = chat.tokenize(Conversation(dirty))
    count = lambda ids: sorted(i for i in ids if i in control_ids)  # noqa: E731
    assert count(native) != count(clean_ids), "the injected strings should be control tokens natively"
    assert count(guarded.input_ids) == count(clean_ids)
    assert guarded.escaped_control_tokens >= 2
    # the text survives: decoding the guarded ids gives the injected strings back
    assert "<|eot_id|>" in tokenizer.decode(guarded.input_ids)


def test_reject_policy_names_the_tokens(assets):
    chat = ChatFormat.from_dir(assets["llama3_1"], special_tokens="reject")
    with pytest.raises(ConversationError, match=r"control-token strings \(<\|eot_id\|>\)"):
        chat.tokenize(Conversation([{"role": "user", "content": "x"},
                                    {"role": "assistant", "content": "done<|eot_id|>"}]))
    ok = chat.tokenize(Conversation([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]))
    assert ok.input_ids


@pytest.mark.parametrize("family", ["llama3_1", "qwen2_5", "gemma3"])
def test_truncation_keeps_the_end_and_the_bos(assets, family):
    chat = ChatFormat.from_dir(assets[family], max_length=64)
    full_chat = ChatFormat.from_dir(assets[family])
    messages = sample_conversations(long_words=400)["long"]
    full = full_chat.tokenize(Conversation(messages)).input_ids
    cut = chat.tokenize(Conversation(messages))
    assert cut.truncated and cut.num_tokens_before_truncation == len(full) > 64
    assert len(cut.input_ids) == 64
    bos = chat.tokenizer.bos_token_id
    if bos is not None and full[0] == bos:
        assert cut.input_ids[0] == bos and cut.input_ids[1:] == full[-63:]
    else:
        assert cut.input_ids == full[-64:]
    assert messages[-1]["content"][-30:] in chat.tokenizer.decode(cut.input_ids)  # the response end survives


def test_template_that_rejects_system_role_is_a_row_error(assets):
    chat = ChatFormat.from_dir(assets["gemma3"], chat_template_file=template_path("gemma"))
    with pytest.raises(ConversationError, match="System role not supported"):
        chat.tokenize(Conversation(sample_conversations()["system_prompt"]))
    assert chat.tokenize(Conversation(sample_conversations()["multi_turn"])).input_ids


def test_missing_template_is_a_clear_error(assets, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(assets["llama3_1"]), local_files_only=True)
    tokenizer.chat_template = None
    with pytest.raises(MissingChatTemplateError, match="--chat-template"):
        ChatFormat(tokenizer)


def test_fingerprints_identify_template_and_tokenizer(assets, tmp_path):
    llama = ChatFormat.from_dir(assets["llama3_1"])
    llama_other_template = ChatFormat.from_dir(assets["llama3_1"], chat_template_file=template_path("llama3_2"))
    assert llama.template_sha256 != llama_other_template.template_sha256
    assert fingerprint_tokenizer_dir(assets["llama3_1"]) == fingerprint_tokenizer_dir(assets["llama3_1"])
    assert fingerprint_tokenizer_dir(assets["llama3_1"]) != fingerprint_tokenizer_dir(assets["qwen2_5"])
