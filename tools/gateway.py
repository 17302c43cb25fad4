"""`templar gateway`: OpenRLHF's remote reward server (POST /get_reward) on Triton-served RMs, each applying its own
chat template to conversations parsed back from the actor's text (templar.integrations.gateway)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from templar.client_options import ClientFlags, env_var
from templar.errors import ConfigError, TemplarError
from templar.integrations.gateway import GatewayOptions, build
from templar.steps import AGGREGATES
from templar.tools.export import json_object

CLIENT_FLAGS = ClientFlags()  # every option of the reward client: --url, --tls ..., --request-timeout-s, ...


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = GatewayOptions
    parser.add_argument("--actor-template", help="the actor's tokenizer folder (with its chat template), or a family "
                        "fetched by `templar assets` (qwen2_5, llama3_1, ...)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME[:WEIGHT]",
                        help="a served reward model and its weight in the reward (default 1); repeat for several")
    parser.add_argument("--host", default=d.host, help="address to bind (default: %(default)s, loopback only)")
    parser.add_argument("--port", type=int, default=d.port, help="(default: %(default)s)")
    parser.add_argument("--failed-reward", type=float, help="reward of a row that cannot be parsed or scored, flagged "
                        "in extra_logs (default: none, the request fails with the rows' reasons)")
    parser.add_argument("--aggregate", choices=AGGREGATES,
                        help="a process RM's step scores -> its reward: min, last or mean (default: the aggregate it "
                        "was exported with); its steps go to extra_logs as templar/<rm>/num_steps, min_step, last_step")
    parser.add_argument("--batch-delay-ms", type=float, default=d.batch_delay_ms,
                        help="how long a request's rows wait to be scored with those of concurrent requests "
                        "(default: %(default)s)")
    parser.add_argument("--actor-template-kwargs", type=json_object, default={},
                        help="variables of the actor's template as JSON, e.g. '{\"date_string\": \"26 Jul 2024\"}'")
    parser.add_argument("--print-reward-func", action="store_true",
                        help="print the paths of the reward-function files for OpenRLHF and verl, then exit")
    CLIENT_FLAGS.add(parser)


def print_reward_functions() -> None:
    import templar.integrations.openrlhf_reward_func as openrlhf
    import templar.integrations.verl as verl

    print(f"OpenRLHF  --reward.remote_url {Path(openrlhf.__file__).resolve()}")
    print("          with TEMPLAR_ACTOR_TEMPLATE, TEMPLAR_MODELS, TEMPLAR_URL [, TEMPLAR_FAILED_REWARD] set, and the "
          f"client's options as {env_var('tls')}, {env_var('tls_ca')}, {env_var('request_timeout_s')}, ...")
    print(f"verl      custom_reward_function.path={Path(verl.__file__).resolve()}")
    print("          custom_reward_function.name=compute_score (or compute_score_batch), "
          "custom_reward_function.reward_kwargs.models=NAME[:WEIGHT],... (and .url, .tls, .tls_ca, ...)")


def main(args: argparse.Namespace) -> int:
    if args.print_reward_func:
        print_reward_functions()
        return 0
    if not args.actor_template or not args.model:
        raise ConfigError("give --actor-template and at least one --model (or --print-reward-func)")
    options = GatewayOptions(actor_template=args.actor_template, models=args.model, host=args.host, port=args.port,
                             failed_reward=args.failed_reward, batch_delay_ms=args.batch_delay_ms,
                             aggregate=args.aggregate,
                             template_kwargs=args.actor_template_kwargs, client=CLIENT_FLAGS.config(args))
    app, ensemble, _ = build(options)
    try:
        for name, fingerprints in ensemble.connect().items():
            print(f"{name}: chat_template sha256 {fingerprints.get('chat_template_sha256', '?')[:16]}…", flush=True)
    except TemplarError as exc:
        print(f"warning: the reward models do not answer yet ({exc}); /health says when they do", file=sys.stderr)
    import uvicorn

    print(f"templar gateway on http://{options.host}:{options.port}/get_reward (actor template "
          f"{options.actor_template}; rewards from {', '.join(options.models)} at "
          f"{', '.join(options.client.endpoints)}{' over TLS' if options.client.tls else ''})", flush=True)
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning", access_log=False)
    ensemble.close()
    return 0
