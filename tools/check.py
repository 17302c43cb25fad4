"""`templar check`: are the served scores the RM's own? Scores a JSONL file through the served RM (over gRPC) and
through the model's own forward pass, and prints the largest difference.

The reference is the model card's snippet, run on the RM folder you exported from:
`rm(**tok.apply_chat_template(messages, return_dict=True, return_tensors="pt")).logits[0][0]` with the untouched
Hugging Face `*ForSequenceClassification` in float32 (for an OpenRLHF value-head RM, OpenRLHF's reading: the value
head at the last token). The served RM's own template variables (`template_kwargs`) are used on both sides, and its
template fingerprint must match the one the reference renders with. Rows the comparison cannot be fair on are listed,
not compared: rows the server truncated (the reference reads them whole) and rows whose content holds control-token
strings (the served path escapes them; the model card's snippet does not).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from templar import contract
from templar.chat_format import ChatFormat
from templar.conversation import parse_conversation
from templar.errors import ConfigError
from templar.client_options import ClientFlags
from templar.reward_client import RewardClient
from templar.tools.workload import load_conversations

DEFAULT_TOLERANCE = 1e-5  # the README's Fidelity bound for fp32
CLIENT_FLAGS = ClientFlags()  # every option of the reward client: --url, --tls ..., --max-attempts, ...


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="the Hugging Face RM folder the served RM was "
                        "exported from")
    parser.add_argument("--data", required=True, type=Path, help='JSONL, one {"messages": [...]} per line')
    parser.add_argument("--name", help="the served RM's name (default: the folder's name)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder, when not beside the weights")
    parser.add_argument("--chat-template", type=Path, help="the Jinja template the RM was exported with "
                        "(--chat-template of `templar export`), when not the folder's own")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest |served - own| / max(1, |own|) accepted (default: %(default)g; fp32)")
    parser.add_argument("--out", type=Path, help="write the per-row comparison as JSON here")
    CLIENT_FLAGS.add(parser)


def reference_inputs(tokenizer, row: dict, kwargs: dict) -> dict:
    """What the model card feeds the RM for one row: apply_chat_template's ids and mask (with the row's tools and
    template variables), or, for a {"text": ...} row, the tokenizer's own reading of the text."""
    if "text" in row:
        return tokenizer(row["text"], return_tensors="pt")
    return tokenizer.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=True, return_dict=True,
                                         return_tensors="pt", **{**kwargs, **(row.get("template_kwargs") or {})})


def own_forward_scores(model_dir: Path, tokenizer, rows: list[dict], kwargs: dict) -> np.ndarray:
    """The model's own forward, one row at a time, in float32: the untouched HF classifier (or, for an OpenRLHF
    value-head RM, OpenRLHF's reading at the last token)."""
    import torch

    from templar.export.scorer import ScorePosition, load_reward_model, reference_scores

    loaded = load_reward_model(model_dir)
    inputs = [reference_inputs(tokenizer, row, kwargs) for row in rows]
    if loaded.classifier is not None:
        with torch.no_grad():
            return np.array([float(loaded.classifier(**x).logits[0][0]) for x in inputs])
    last = ScorePosition("last-token", None, "OpenRLHF's value-head reading")
    return reference_scores(loaded, last, [x["input_ids"][0].tolist() for x in inputs])


def main(args) -> int:
    from templar.export.scorer import parity_error

    rows = load_conversations(args.data)  # checked before connecting: a bad file names its line
    name = args.name or args.model.name
    chat = ChatFormat.from_dir(args.tokenizer or args.model, chat_template_file=args.chat_template)
    with RewardClient(CLIENT_FLAGS.config(args, model=name)) as client:
        client.connect()
        served_sha = client.parameters.get(contract.PARAM_TEMPLATE_SHA256)
        if served_sha and served_sha != chat.template_sha256:
            raise ConfigError(f"{name} serves another chat template (sha256 {served_sha[:16]}...) than {args.model} "
                              f"has ({chat.template_sha256[:16]}...): pass the template it was exported with, "
                              "--chat-template FILE")
        kwargs = json.loads(client.parameters.get(contract.PARAM_TEMPLATE_KWARGS) or "{}")
        result = client.score(rows)
        position = client.parameters.get(contract.PARAM_SCORE_POSITION, "?")
    chat.template_kwargs = kwargs
    skipped = {}
    for i, row in enumerate(rows):
        if not contract.is_ok(result.status[i]):
            skipped[i] = result.status[i]
        elif result.truncated[i]:
            skipped[i] = "truncated by the server (the reference reads the whole conversation)"
        elif "messages" in row and chat.control_tokens_in(parse_conversation(row)):
            skipped[i] = "content holds control-token strings (the served path escapes them)"
    compared = [i for i in range(len(rows)) if i not in skipped]
    own = own_forward_scores(args.model, chat.tokenizer, [rows[i] for i in compared], kwargs)
    served = result.scores[compared].astype(np.float64)
    errors = parity_error(served, own) if compared else np.zeros(0)
    print(f"{'row':>4} {'served':>12} {'own forward':>12} {'rel |d|':>9}  tokens")
    for k, i in enumerate(compared):
        print(f"{i:4d} {served[k]:12.6f} {own[k]:12.6f} {errors[k]:9.2e}  {int(result.num_tokens[i])}")
    for i, why in skipped.items():
        print(f"{i:4d} not compared: {why}")
    worst = float(errors.max()) if len(errors) else float("nan")
    over = int((errors > args.tolerance).sum())
    print(f"{name} (score position {position}) vs {args.model}'s own forward: {len(compared)} rows compared, "
          f"largest |served - own| / max(1, |own|) = {worst:.2e} (tolerance {args.tolerance:g}), {over} over; "
          f"{len(skipped)} not compared", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps({"model": name, "compared": len(compared), "max_relative_diff": worst,
                                        "over_tolerance": over, "tolerance": args.tolerance,
                                        "rows": [{"row": i, "served": float(served[k]), "own": float(own[k]),
                                                  "relative_diff": float(errors[k])}
                                                 for k, i in enumerate(compared)],
                                        "not_compared": {str(i): why for i, why in skipped.items()}}, indent=1))
    return 1 if over or not compared else 0
