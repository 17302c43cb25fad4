"""The actor's side of a rollout: its own chat template on the prompt, sampling, cutting at its end-of-turn token,
decoding back to plain text (no actor special tokens), and the log-probs / values over the generated tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from templar.chat_format import ChatFormat
from templar.conversation import Conversation, Messages
from templar.padding import position_ids
from templar.trainer.config import GenerationConfig
from templar.trainer.ppo import token_logprobs, token_logprobs_and_entropy


@dataclass
class Rollout:
    query_ids: torch.Tensor  # [B, Lq] left-padded, the actor's template with the generation prompt
    query_mask: torch.Tensor  # [B, Lq]
    response_ids: torch.Tensor  # [B, Lr] right-padded after the first stop token
    response_mask: torch.Tensor  # [B, Lr] 1 up to and including the first stop token
    ended: torch.Tensor  # [B] bool: the response produced a stop token
    texts: list[str]  # the responses as plain text, without the stop token or any special token

    @property
    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.query_ids, self.response_ids], 1), torch.cat([self.query_mask, self.response_mask], 1)


def encode_prompts(chat: ChatFormat, prompts: list[Messages], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The actor's template with the generation prompt, left-padded so every row generates from the same column."""
    rows = [chat.tokenize(Conversation(p), add_generation_prompt=True).input_ids for p in prompts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def cut_at_stop(tokens: torch.Tensor, stop_ids: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    """Keep each row up to and including its first stop token; mask and pad the rest. Returns (ids, mask, ended)."""
    is_stop = torch.isin(tokens, torch.tensor(stop_ids, dtype=tokens.dtype))
    ended = is_stop.any(1)
    first = torch.where(ended, is_stop.float().argmax(1), torch.full_like(ended, tokens.shape[1], dtype=torch.long))
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    mask = (positions <= first[:, None]).long()
    return torch.where(mask.bool(), tokens, torch.full_like(tokens, pad_id)), mask, ended


def decode_responses(chat: ChatFormat, response_ids: torch.Tensor, mask: torch.Tensor,
                     ended: torch.Tensor) -> list[str]:
    """Plain text of each response: the stop token dropped, special tokens skipped."""
    texts = []
    for ids, m, done in zip(response_ids, mask, ended):
        kept = ids[m.bool()].tolist()
        if done:
            kept = kept[:-1]
        texts.append(chat.tokenizer.decode(kept, skip_special_tokens=True))
    return texts


class CategoricalSampler:
    """A logits processor that makes greedy decoding sample: it draws one token per row from softmax(logits / T),
    restricted to the top-p set, by inverting the distribution's cumulative sum with one uniform number per row,
    and returns scores whose argmax is that token. The same distribution as `do_sample=True`, without
    torch.multinomial, which took 115 ms per token for 32 rows over the actor's 151k-token vocabulary on the CPU
    (85% of the demo's rollout time). Uniforms come from torch's global RNG (seeded per run)."""

    def __init__(self, temperature: float, top_p: float) -> None:
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores if self.temperature == 1.0 else scores / self.temperature, dim=-1)
        if self.top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
            ordered, order = probs.sort(dim=-1, descending=True)
            before = ordered.cumsum(-1) - ordered  # the probability mass of the tokens ranked above
            probs = probs.scatter(-1, order, ordered.masked_fill(before >= self.top_p, 0.0))
        cdf = probs.cumsum(-1)
        draw = torch.rand((len(cdf), 1), dtype=cdf.dtype) * cdf[:, -1:]
        # the first token whose cumulative mass exceeds the draw: a zero-probability token never is
        token = torch.searchsorted(cdf, draw, right=True).clamp_(max=cdf.shape[-1] - 1)
        return torch.full_like(scores, -torch.inf).scatter_(-1, token, 0.0)


@torch.no_grad()
def generate(model, chat: ChatFormat, prompts: list[Messages], gen: GenerationConfig, stop_ids: list[int],
             pad_id: int, synced_gpus: bool = False) -> Rollout:
    from transformers import LogitsProcessorList

    query_ids, query_mask = encode_prompts(chat, prompts, pad_id)
    sampler = LogitsProcessorList([CategoricalSampler(gen.temperature, gen.top_p)])
    output = model.generate(input_ids=query_ids, attention_mask=query_mask, do_sample=False, num_beams=1,
                            logits_processor=sampler, temperature=None, top_p=None, top_k=None,
                            max_new_tokens=gen.max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
                            synced_gpus=synced_gpus)
    response_ids, response_mask, ended = cut_at_stop(output[:, query_ids.shape[1]:], stop_ids, pad_id)
    texts = decode_responses(chat, response_ids, response_mask, ended)
    return Rollout(query_ids, query_mask, response_ids, response_mask, ended, texts)


def _response_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor,
                     response_length: int) -> torch.Tensor:
    """Logits predicting each response token, [B, Lr, V]; only the needed positions' logits are computed."""
    return model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                 logits_to_keep=response_length + 1, use_cache=False).logits[:, :-1]


def response_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, response_length: int,
                      temperature: float) -> torch.Tensor:
    """log pi(response token | everything before it), [B, Lr]."""
    logits = _response_logits(model, sequences, attention_mask, response_length)
    return token_logprobs(logits, sequences[:, -response_length:], temperature)


def response_logprobs_and_entropy(model, sequences: torch.Tensor, attention_mask: torch.Tensor, response_length: int,
                                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probs above and the policy's entropy at each response position, from one forward pass."""
    logits = _response_logits(model, sequences, attention_mask, response_length)
    return token_logprobs_and_entropy(logits, sequences[:, -response_length:], temperature)


def response_values(critic, sequences: torch.Tensor, attention_mask: torch.Tensor,
                    response_length: int) -> torch.Tensor:
    """V(state before each response token), [B, Lr], from the critic's per-token head."""
    values = critic(input_ids=sequences, attention_mask=attention_mask,
                    position_ids=position_ids(attention_mask)).logits[..., 0]
    return values[:, -response_length - 1:-1].float()
