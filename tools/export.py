"""`templar export`: a Hugging Face reward model -> ONNX + the Triton entries that apply the RM's own template
(templar.export.exporter). Defaults come from ExportOptions and EntrySettings."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from templar.chat_format import SPECIAL_TOKEN_POLICIES
from templar.errors import ConfigError
from templar.export.exporter import (DEFAULT_MAX_LENGTH_CAP, FORMATS, PRECISIONS, TOLERANCES, ExportOptions,
                                     export_reward_model)
from templar.export.repository import EntrySettings
from templar.serving.cpu_precision import CPU_RUNTIMES
from templar.export.scorer import SCORE_POSITIONS
from templar.steps import AGGREGATES, PRESETS, READINGS, StepFormat, step_format


def json_object(text: str) -> dict:
    """argparse type: a JSON object, e.g. '{"date_string": "26 Jul 2024"}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object {{...}}, got {text!r}")
    return value


def json_weights(text: str) -> dict | list:
    """argparse type of --objective-weights: {"label": weight, ...} or [w0, w1, ...]."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg}): {text!r}") from None
    numbers = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    if numbers is None or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        raise argparse.ArgumentTypeError(f'must be {{"label": weight, ...}} or [weight, ...], got {text!r}')
    return value


def positive_int(text: str) -> int:
    """argparse type of --version."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_prm_arguments(parser) -> None:
    """--kind and the process-RM options (templar.steps.StepFormat's fields)."""
    parser.add_argument("--kind", default=ExportOptions.kind, choices=("rm", "prm"),
                        help="rm: an outcome RM, one score per conversation (default); prm: a process RM, a score per "
                        "step of the response, read in its own step format (--prm-preset; docs/process-rms.md)")
    parser.add_argument("--objective-weights", type=json_weights,
                        help='a multi-objective RM (num_labels > 1): SCORE = sum of weight * objective, as JSON: '
                        '\'{"helpfulness": 1.0, "verbosity": -0.2}\' (an objective not named weighs 0) or a list in '
                        "label order; its objectives are served as SCORES")
    parser.add_argument("--objective-names", type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
                        help="an RM whose own code combines its objectives (ArmoRM; --trust-remote-code): their "
                        "names, comma-separated, in its order (default: config.id2label where it names each, else "
                        "objective_<i>)")
    prm = parser.add_argument_group("process RMs (--kind prm): the preset's step format, any field overridden")
    prm.add_argument("--prm-preset", choices=sorted(PRESETS),
                     help="qwen-prm (Qwen2.5-Math-PRM: <extra_0> after each step, P(class 1) of its 2-class head), "
                     "math-shepherd (' ки' after each step, P('+') over the '+'/'-' logits of a causal LM), "
                     "value-head (an OpenRLHF value head read at each '<step>')")
    prm.add_argument("--step-tag", help="the PRM's step tag: one token of its tokenizer, written after each step")
    prm.add_argument("--step-reading", choices=READINGS, help="how the score at a tag is computed")
    prm.add_argument("--positive-class", type=int, help="class-probability: the class whose probability is the score")
    prm.add_argument("--reward-tokens", nargs=2, metavar=("GOOD", "BAD"),
                     help="token-logits: the two tokens whose softmax gives P(GOOD)")
    prm.add_argument("--system-prompt", help="the PRM's own system prompt (replaces the conversation's)")
    prm.add_argument("--step-separator", help="what cuts a response into steps when the client sends none, e.g. "
                     "'\\n\\n' (\\n and \\t are read as newline and tab)")
    prm.add_argument("--aggregate", choices=AGGREGATES, help="SCORE of a row: min, last or mean of its step scores")
    prm.add_argument("--max-steps", type=int, help="steps one row may hold (a row with more gets an error)")


def add_cpu_arguments(parser) -> None:
    """How the embedded CPU scorer runs (EntrySettings' scorer knobs)."""
    d = EntrySettings()
    cpu = parser.add_argument_group("the embedded CPU scorer (docs/benchmarks.md)")
    cpu.add_argument("--cpu-runtime", default=d.cpu_runtime, choices=CPU_RUNTIMES,
                     help="torch: the RM's own modules on packed rows, shared prefixes computed once (falls back to "
                     "onnxruntime, saying why, for a model it cannot run); onnxruntime: the ONNX graph, scores "
                     "bit-identical whatever the batch; openvino: the graph in OpenVINO (default: %(default)s)")
    cpu.add_argument("--no-prefix-sharing", action="store_true",
                     help="torch: compute every row's whole prefix")
    cpu.add_argument("--no-compile", action="store_true",
                     help="torch: run the layers uncompiled (torch.compile needs a C++ compiler; without one the "
                     "scorer falls back by itself)")


def add_limit_arguments(parser) -> None:
    """The entry's limits against hostile input (EntrySettings' row and request limits)."""
    d = EntrySettings()
    limits = parser.add_argument_group("limits against hostile input (docs/reliability.md)")
    limits.add_argument("--max-row-bytes", type=int, default=d.max_row_bytes,
                        help="bytes of one conversation row; larger rows get a per-row error (default: %(default)s)")
    limits.add_argument("--max-messages", type=int, default=d.max_messages,
                        help="messages in one row (default: %(default)s)")
    limits.add_argument("--max-json-depth", type=int, default=d.max_json_depth,
                        help="JSON nesting of one row (default: %(default)s)")
    limits.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                        help="all rows of one request; a larger request is refused whole (default: %(default)s)")
    limits.add_argument("--max-queue-size", type=int, default=d.max_queue_size,
                        help="requests waiting for the RM; more are refused at once (UNAVAILABLE) so clients back "
                             "off instead of queueing without end; 0 = unbounded (default: %(default)s)")


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="Hugging Face reward model folder")
    parser.add_argument("--name", required=True, help="the RM's model name in Triton")
    parser.add_argument("--repo", type=Path, default=ExportOptions.repo,
                        help="model repository to write into (default: %(default)s)")
    parser.add_argument("--version", type=positive_int,
                        help="write version N beside the existing versions (a hot swap: then `templar reload`); "
                        "must be the newest. Default: version 1, replacing the model's folders")
    parser.add_argument("--force", action="store_true", help="with --version: replace that version if it exists")
    parser.add_argument("--max-length", type=int, help="token limit; longer conversations are cut from the start "
                        f"(default: min(max_position_embeddings, {DEFAULT_MAX_LENGTH_CAP}))")
    parser.add_argument("--chat-template", type=Path, help="Jinja chat template file (overrides the folder's)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder, when not beside the weights")
    parser.add_argument("--format", default=ExportOptions.format, choices=FORMATS,
                        help="onnx (default; CPU and GPU) or tensorrt (also a TensorRT engine for the GPU container; "
                        "needs TensorRT and a GPU where the export runs)")
    parser.add_argument("--special-tokens", default=ExportOptions.special_tokens, choices=SPECIAL_TOKEN_POLICIES,
                        help="control-token strings inside content: tokenize as text (escape) or fail the row "
                        "(default: %(default)s)")
    parser.add_argument("--template-kwargs", type=json_object, default={},
                        help='fixed extra template variables as JSON, e.g. \'{"date_string": "26 Jul 2024"}\'')
    parser.add_argument("--value-head-prefix", help="OpenRLHF value-head RMs: the head's name (default: value_head)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow *.bin/*.pt weights (pickle runs code)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model code shipped in the folder (config.json auto_map); read it first")
    parser.add_argument("--precision", default=ExportOptions.precision, choices=PRECISIONS,
                        help="what is served: auto (fp32, but bf16 in the CPU scorer where the serving CPU measures "
                        "a bf16 product at least 1.3x faster than fp32: AMX, Zen 4), fp32 (everywhere), bf16 (the CPU "
                        "scorer in bf16; with --format tensorrt also a BF16 engine), int8 (for the CPU: the packed "
                        "scorer's int8 products, or ONNX Runtime's dynamic quantization where the ONNX graph serves), "
                        "fp16 (the GPU paths) (default: %(default)s)")
    parser.add_argument("--score-position", default=ExportOptions.score_position, choices=SCORE_POSITIONS,
                        help="where each score is read: auto (where the model's own forward reads it: for a "
                        "*ForSequenceClassification the last token that is not config.pad_token_id, for an OpenRLHF "
                        "value-head RM the last token), last-non-pad, or last-token (for RMs trained by code that "
                        "read the last token even where the template ends with the pad token) (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, help="max |onnxruntime - reference| / max(1, |reference|) allowed "
                        "on the sample conversations (default: "
                        + ", ".join(f"{k} {v:g}" for k, v in TOLERANCES.items()) + ")")
    parser.add_argument("--engine-tolerance", type=float,
                        help="max |tensorrt - torch| allowed (default 1e-3, or 5e-2 with --gpu-fp16)")
    parser.add_argument("--opset", type=int, default=ExportOptions.opset, help="(default: %(default)s)")
    parser.add_argument("--gpu-fp16", action="store_true", help="the same as --precision fp16")
    add_prm_arguments(parser)
    add_cpu_arguments(parser)
    add_limit_arguments(parser)
    parser.add_argument("--skip-resource-check", action="store_true",
                        help="do not refuse up front when memory or disk look too small")


def step_format_of(args) -> StepFormat | None:
    """The --prm-preset with the flags that change it (None for an outcome RM)."""
    given = {"step_tag": args.step_tag, "reading": args.step_reading, "positive_class": args.positive_class,
             "reward_tokens": tuple(args.reward_tokens) if args.reward_tokens else None,
             "system_prompt": args.system_prompt, "aggregate": args.aggregate, "max_steps": args.max_steps,
             "step_separator": _unescape(args.step_separator) if args.step_separator is not None else None}
    if args.kind != "prm":
        named = sorted(f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None)
        if named or args.prm_preset:
            raise ConfigError(f"{', '.join(named or ['--prm-preset'])}: process-RM options, which go with --kind prm")
        return None
    if not args.prm_preset:
        raise ConfigError(f"--kind prm needs --prm-preset ({', '.join(sorted(PRESETS))})")
    changed = {k: v for k, v in given.items() if v is not None}
    return step_format(args.prm_preset, **changed, **({"preset": f"{args.prm_preset}+custom"} if changed else {}))


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def main(args) -> int:
    opts = ExportOptions(model=args.model, name=args.name, repo=args.repo, max_length=args.max_length,
                         chat_template=args.chat_template, tokenizer=args.tokenizer, format=args.format,
                         special_tokens=args.special_tokens, template_kwargs=args.template_kwargs,
                         value_head_prefix=args.value_head_prefix, allow_pickle=args.allow_pickle,
                         trust_remote_code=args.trust_remote_code,
                         precision="fp16" if args.gpu_fp16 else args.precision, tolerance=args.tolerance,
                         score_position=args.score_position,
                         engine_tolerance=args.engine_tolerance, opset=args.opset,
                         check_resources=not args.skip_resource_check, version=args.version, force=args.force,
                         kind=args.kind, step_format=step_format_of(args), objective_weights=args.objective_weights,
                         objective_names=args.objective_names,
                         settings=EntrySettings(max_row_bytes=args.max_row_bytes, max_messages=args.max_messages,
                                                max_json_depth=args.max_json_depth,
                                                max_request_bytes=args.max_request_bytes,
                                                max_queue_size=args.max_queue_size, cpu_runtime=args.cpu_runtime,
                                                prefix_sharing=not args.no_prefix_sharing,
                                                packed_compile=not args.no_compile))
    export_reward_model(opts, log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0
