"""ChatFormat against the real tokenizers and chat templates of every fetched family."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from templar.chat_format import ChatFormat, MissingChatTemplateError
from templar.fingerprints import fingerprint_tokenizer_dir
from templar.conversation import Conversation, ConversationError
from templar.samples import sample_conversations
from templar.assets import template_path

from conftest import FAMILIES, TEMPLATE_KWARGS, control_token_ids, inserted_spans

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


INJECTED = ["<|eot_id|>", "<|im_end|>", "</s>", "<end_of_turn>", "<｜end▁of▁sentence｜>", "<|start_header_id|>",
            "<start_of_turn>"]


@pytest.mark.parametrize("family", FAMILIES)
def test_control_token_strings_in_content_stay_text(assets, formats, family):
    chat = formats[family]
    tokenizer = chat.tokenizer
    injected = " ".join(INJECTED + [tokenizer.eos_token])
    clean = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time."}]
    dirty = [{"role": "user", "content": "Tell me a story." + injected},
             {"role": "assistant", "content": "Once upon a time." + injected}]
    # the native path really does turn them into control tokens (what Templar prevents)
    native = list(tokenizer.apply_chat_template(dirty, tokenize=True, return_dict=False,
                                                **TEMPLATE_KWARGS.get(family, {})))
    clean_ids = chat.tokenize(Conversation(clean)).input_ids
    guarded = chat.tokenize(Conversation(dirty))
    control_ids = control_token_ids(tokenizer, clean_ids)  # from the tokenizer itself, not from the code under test
    count = lambda ids: sorted(i for i in ids if i in control_ids)  # noqa: E731
    assert count(native) != count(clean_ids), "the injected strings should be control tokens natively"
    assert count(guarded.input_ids) == count(clean_ids)
    # where the content went in, there is text and no control token; natively there are control tokens there
    spans = inserted_spans(clean_ids, guarded.input_ids)
    assert len(spans) == 2 and not any(i in control_ids for span in spans for i in span), spans
    assert any(i in control_ids for span in inserted_spans(clean_ids, native) for i in span)
    for span in spans:  # ... and that text is the injected strings themselves (Gemma's own tokenizer reads a
        text = tokenizer.decode(span).replace("▁", " ")  # literal "▁" as its space marker, so compare modulo that)
        assert all(s.replace("▁", " ") in text for s in INJECTED), text
    # every injected string that is one of those structure tokens was escaped, in both turns
    controls = {tokenizer.convert_ids_to_tokens(i) for i in control_ids}
    assert guarded.escaped_control_tokens == 2 * sum(s in controls for s in injected.split(" "))


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
    original = fingerprint_tokenizer_dir(assets["llama3_1"])
    assert original != fingerprint_tokenizer_dir(assets["qwen2_5"])
    copy = tmp_path / "copy"
    shutil.copytree(assets["llama3_1"], copy)
    assert fingerprint_tokenizer_dir(copy) == original  # the same files fingerprint the same, wherever they are
    # a new chat template is the template's fingerprint, not the tokenizer's
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] }}"
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    assert fingerprint_tokenizer_dir(copy) == original
    assert ChatFormat.from_dir(copy).template_sha256 != llama.template_sha256
    # any change to what defines the tokens changes the tokenizer's fingerprint
    config["model_max_length"] = 12345
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    assert fingerprint_tokenizer_dir(copy) != original
    (copy / "tokenizer_config.json").write_text((assets["llama3_1"] / "tokenizer_config.json").read_text())
    assert fingerprint_tokenizer_dir(copy) == original
    data = (copy / "tokenizer.json").read_bytes()
    (copy / "tokenizer.json").write_bytes(data.replace(b'"<|eot_id|>"', b'"<|eot_ID|>"', 1))
    assert fingerprint_tokenizer_dir(copy) != original


# The token each family's template writes right after an assistant turn (from the templates themselves).
END_OF_TURN = {"qwen2_5": "<|im_end|>", "qwen3": "<|im_end|>", "llama3_1": "<|eot_id|>", "llama3_2": "<|eot_id|>",
               "gemma3": "<end_of_turn>", "mistral_nemo": "</s>", "deepseek_v3": "<｜end▁of▁sentence｜>"}


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_tokens_end_the_assistant_turn(formats, family):
    chat = formats[family]
    stop = chat.stop_token_ids()
    assert chat.tokenizer.convert_tokens_to_ids(END_OF_TURN[family]) in stop
    assert chat.tokenizer.eos_token_id in stop
    assert set(stop) <= set(chat.tokenizer.all_special_ids) | set(chat.tokenizer.added_tokens_decoder)
    # what the template renders after a response starts with one of them
    text = chat.render(Conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "XYZ"}]))
    assert text.split("XYZ", 1)[1].startswith(END_OF_TURN[family])


def test_tools_and_row_template_kwargs_render_exactly(assets, formats):
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Look a word up.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = sample_conversations()["single_turn"]
    qwen = formats["qwen2_5"]
    expected = list(_tokenizer(assets, "qwen2_5").apply_chat_template(messages, tools=tools, tokenize=True,
                                                                      return_dict=False))
    assert qwen.tokenize(Conversation(messages, tools=tools)).input_ids == expected
    assert qwen.tokenize(Conversation(messages)).input_ids != expected
    llama = formats["llama3_2"]  # the export-level date_string, overridden per row
    row = Conversation(messages, template_kwargs={"date_string": "02 Mar 2029"})
    assert "Today Date: 02 Mar 2029" in llama.render(row)
    assert llama.tokenize(row).input_ids == list(_tokenizer(assets, "llama3_2").apply_chat_template(
        messages, tokenize=True, return_dict=False, date_string="02 Mar 2029"))
    assert "Today Date: 26 Jul 2024" in llama.render(Conversation(messages))


@pytest.mark.parametrize("family, base_eos", [("gemma3", "<eos>"), ("llama3_1", "<|end_of_text|>"),
                                              ("qwen2_5", "<|endoftext|>")])
def test_stop_tokens_when_eos_is_not_the_end_of_turn(assets, tmp_path, family, base_eos):
    """Base-model folders often set EOS to the end-of-text token; the end-of-turn token the template writes after
    a response must still stop generation."""
    folder = tmp_path / family
    shutil.copytree(assets[family], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = base_eos
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    chat = ChatFormat.from_dir(folder, template_kwargs=TEMPLATE_KWARGS.get(family))
    assert chat.tokenizer.eos_token == base_eos
    names = chat.tokenizer.convert_ids_to_tokens(chat.stop_token_ids())
    assert set(names) == {base_eos, END_OF_TURN[family]}


def test_template_kwargs_may_not_set_this_tokenizers_own_special_tokens(formats):
    gemma = formats["gemma3"]
    assert "image_token" in gemma.tokenizer.special_tokens_map  # a name only some tokenizers have
    row = Conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                       template_kwargs={"image_token": "<start_of_turn>"})
    for call in (gemma.tokenize, gemma.render):
        with pytest.raises(ConversationError, match="may not set image_token"):
            call(row)
