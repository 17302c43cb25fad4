"""A short supervised warm start for the demo's tiny actor (`models.actor: tiny-chat:<family>`).

A randomly initialised actor samples token soup that never ends its turn, so PPO against RMs that judge answers has
nothing to work with. This teaches the tiny causal LM, with its own chat template, to answer the built-in topic
questions (templar.trainer.preferences) in the answers' format and to END its turn: kind or dismissive, polite or flat,
each half the time, so that about a quarter of its answers keep the rule at the start and PPO has a preference to find.
The loss is the usual next-token cross-entropy on the assistant tokens only (the end-of-turn token included).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch

from templar.chat_format import ChatFormat
from templar.conversation import Conversation
from templar.trainer.preferences import TOPICS, answer, question
from templar.padding import right_pad

log = logging.getLogger("templar.trainer")


def warm_start_examples(chat: ChatFormat, count: int, seed: int) -> list[tuple[list[int], int]]:
    """(token ids of prompt + answer + end of turn, where the answer starts)."""
    rng = random.Random(seed)
    stops = set(chat.stop_token_ids())
    examples = []
    for _ in range(count):
        topic = rng.choice(TOPICS)
        prompt = question(rng, topic)
        reply = answer(rng, topic, kind=rng.random() < 0.5, polite=rng.random() < 0.5)
        prefix = chat.tokenize(Conversation(prompt), add_generation_prompt=True).input_ids
        full = chat.tokenize(Conversation(prompt + [{"role": "assistant", "content": reply}])).input_ids
        if full[:len(prefix)] != prefix:
            raise ValueError("the chat template renders the answer's prompt differently from the generation prompt")
        end = next((i + 1 for i in range(len(prefix), len(full)) if full[i] in stops), len(full))
        examples.append((full[:end], len(prefix)))  # nothing after the end-of-turn token is learned
    return examples


def warm_start(model_dir: str | Path, *, steps: int = 150, batch_size: int = 32, lr: float = 3e-3,
               seed: int = 0) -> dict[str, float]:
    """Fine-tune the causal LM in `model_dir` in place; returns the first and last training loss."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    chat = ChatFormat.from_dir(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    examples = warm_start_examples(chat, steps * batch_size, seed)
    pad = chat.tokenizer.pad_token_id if chat.tokenizer.pad_token_id is not None else chat.stop_token_ids()[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    backbone, lm_head = getattr(model, model.base_model_prefix), model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    losses = []
    started = time.monotonic()
    for step in range(steps):
        batch = examples[step * batch_size:(step + 1) * batch_size]
        ids, mask = (torch.from_numpy(a) for a in right_pad([row for row, _ in batch], pad))
        learned = torch.zeros(ids.shape, dtype=torch.bool)  # positions that predict an answer token
        for i, (row, start) in enumerate(batch):
            learned[i, start - 1:len(row) - 1] = True
        hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        # the LM head (the whole vocabulary) only where an answer token is predicted: a few tokens of each row
        logits = lm_head(hidden[learned]).float()
        if softcap:  # Gemma-2/3 cap their logits in the model's own forward; the same here
            logits = torch.tanh(logits / softcap) * softcap
        targets = ids[:, 1:][learned[:, :-1]]
        loss = torch.nn.functional.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            elapsed = time.monotonic() - started
            log.info("warm start: step %d/%d, loss %.3f, %.0f s left", step + 1, steps, losses[-1],
                     elapsed / (step + 1) * (steps - step - 1))
    model.save_pretrained(str(model_dir), safe_serialization=True)
    log.info("warm start of %s: %d steps, loss %.3f -> %.3f", model_dir, steps, losses[0], losses[-1])
    return {"first_loss": losses[0], "last_loss": losses[-1]}
