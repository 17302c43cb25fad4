"""`templar score-demo`: the reward models of a training config (by default the demo's Llama-3 and Gemma-3 RMs),
exported when missing, served by the embedded Triton, and scored over gRPC on the same structured conversations.
Each RM formats them its own way, and the demo prints what each one saw.

The demo RMs are small and randomly initialised on the REAL tokenizers and templates (there is no model hub here), so
the scores demonstrate the serving path, not judgement quality.
"""

from __future__ import annotations

import time
from pathlib import Path

from templar import contract
from templar.server.ports import DEFAULT_PORTS, free_port, port_available
from templar.server.embedded import EmbeddedTriton
from templar.reward_client import RewardClient, RewardClientConfig
from templar.samples import sample_conversations
from templar.trainer.config import load_config
from templar.trainer.reward_server import ensure_exported


def _ports(host: str) -> dict[str, int]:
    """The default ports when free, otherwise free ones (the demo should not fail on a busy machine)."""
    return {kind: port if port_available(host, port) else free_port(host) for kind, port in DEFAULT_PORTS.items()}


def add_arguments(parser) -> None:
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"),
                        help="training config whose reward.models (and reward.repo) to serve")


def main(args) -> int:
    config = load_config(args.config)
    ensure_exported(config, Path(config.output_dir))
    names = [rm.name for rm in config.reward.models]
    repo = Path(config.reward.repo)
    conversations = sample_conversations(long_words=1200)
    ports = _ports("127.0.0.1")
    print(f"starting the embedded Triton on {repo} ...", flush=True)
    with EmbeddedTriton(repo, grpc_port=ports["grpc"], http_port=ports["http"],
                        metrics_port=ports["metrics"]).start(progress=print) as server:
        results, texts = {}, {}
        for name in names:
            with RewardClient(RewardClientConfig(model=name, endpoints=[server.grpc_url])) as client:
                started = time.perf_counter()
                results[name] = client.score(list(conversations.values()))
                results[name].latency_s = time.perf_counter() - started
                texts[name] = client.rendered_text([conversations["multi_turn"]])[0]
                fingerprint = client.fingerprints.get(contract.PARAM_TEMPLATE_SHA256, "?")[:12]
                print(f"{name}: served at {server.grpc_url}, chat_template sha256 {fingerprint}…")

    print("\nScores served by Triton over gRPC (each RM applied its own chat template):\n")
    header = f"{'conversation':14s}" + "".join(f"{n:>14s} {'tokens':>6s}" for n in names)
    print(header)
    for i, key in enumerate(conversations):
        line = f"{key:14s}"
        for name in names:
            r = results[name]
            mark = "*" if r.truncated[i] else " "
            line += f"{r.scores[i]:14.4f} {r.num_tokens[i]:5d}{mark}" if r.status[i] == "ok" else f"{r.status[i]:>21s}"
        print(line)
    print("(* = cut from the start to fit max_length; the response end is kept)")
    for name in names:
        print(f"\nWhat {name} saw for 'multi_turn':\n{texts[name]!r}")
    failed = sum(r.failed_rows for r in results.values())
    print(f"\n{sum(len(r.status) for r in results.values())} conversations scored, {failed} failed")
    return 0 if failed == 0 else 1
