"""Where the trainer's rewards come from: `reward.url` (a running Triton), or by default an embedded Triton that
rank 0 starts on `reward.repo` after exporting the configured RMs into it, keeps serving (restarted when it or a
model's stub dies: templar.server.supervisor) and stops at the end."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from templar import wire
from templar.server.embedded import EmbeddedTriton
from templar.server.ports import free_server_ports
from templar.errors import ConfigError
from templar.export.exporter import ExportOptions, export_reward_model, is_exported
from templar.server.supervisor import SupervisedTriton
from templar.trainer.config import RewardModelConfig, TrainConfig
from templar.trainer.preferences import SENTENCE_STEPS
from templar.trainer.distributed import World, barrier, run_on_main
from templar.steps import StepFormat, step_format
from templar.trainer.sources import resolve_source

log = logging.getLogger("templar.trainer")
EVENTS_FILE = "reward_server_events.jsonl"  # the embedded server's restarts, one JSON line each


def export_options(config: TrainConfig, output_dir: Path) -> list[ExportOptions]:
    """One ExportOptions per configured RM that has a source (`path`); checks the others are already served."""
    repo = Path(config.reward.repo)
    options = []
    for index, rm in enumerate(config.reward.models):
        if rm.path is None:
            if not (repo / rm.name / "config.pbtxt").is_file():
                raise ConfigError(f"reward model {rm.name!r} is not in {repo} and has no path to export it from")
            continue
        # tiny:<family> of a process RM: a random one of Qwen2.5-Math-PRM's shape (qwen2 and llama families, qwen-prm)
        kind = "process-reward" if rm.kind == "prm" else "reward"
        source = resolve_source(rm.path, f"rm-{rm.name}", kind, output_dir, seed=100 + index).resolve()
        prm = {"kind": "prm", "step_format": prm_step_format(rm)} if rm.kind == "prm" else {}
        trust = rm.trust_remote_code or (rm.kind == "prm" and rm.path.startswith(("tiny:", "tiny-prm:")))  # their code
        options.append(ExportOptions(model=source, name=rm.name, repo=repo, max_length=rm.max_length,
                                     trust_remote_code=trust, **prm))
    return options


def prm_step_format(rm: RewardModelConfig) -> StepFormat:
    """The step format a process RM is exported with: its preset, cut where the config (or the tiny PRM's
    training) says."""
    separator = rm.step_separator
    if separator is None and (rm.path or "").startswith("tiny-prm:"):
        separator = SENTENCE_STEPS  # what templar.trainer.prm_training trained it on
    return step_format(rm.prm_preset, step_separator=separator)


def ensure_exported(config: TrainConfig, output_dir: Path) -> list[str]:
    """Export each configured RM into reward.repo unless the repository already serves that very model (the same
    source files and export options, by the fingerprint recorded at export). Returns the names exported."""
    exported = []
    for opts in export_options(config, output_dir):
        if is_exported(opts):
            continue
        log.info("exporting reward model %s from %s into %s", opts.name, opts.model, opts.repo)
        export_reward_model(opts, log=lambda m: log.info("  %s", m))
        exported.append(opts.name)
    return exported


@contextlib.contextmanager
def reward_endpoints(config: TrainConfig, world: World, output_dir: Path) -> Iterator[list[str]]:
    """reward.url if set; otherwise rank 0 exports the RMs, starts the embedded Triton and stops it at the end.
    An error on rank 0 reaches every rank (raised there too), so none waits forever."""
    if config.reward.url:
        yield wire.parse_endpoints(config.reward.url, "reward.url")
        return
    box: dict[str, SupervisedTriton] = {}

    def start() -> str:
        ensure_exported(config, output_dir)
        server = EmbeddedTriton(config.reward.repo, **free_server_ports(), log_file=output_dir / "tritonserver.log")
        # supervised: restarted on the same ports if it or a model's stub dies (events in the run log and in
        # reward_server_events.jsonl); the reward clients retry and reconnect to the same address
        box["server"] = SupervisedTriton(server, events_path=output_dir / EVENTS_FILE).start(progress=log.info)
        log.info("embedded Triton serving %s on %s", config.reward.repo, server.grpc_url)
        return server.grpc_url

    try:
        url = run_on_main(world, start)
        yield [url]
        barrier()  # no rank may still be scoring when the server goes
    finally:
        if "server" in box:
            box["server"].stop()
            if box["server"].events:
                log.info("embedded Triton: %d restart(s) during the run%s", box["server"].restarts,
                         " (gave up restarting it)" if box["server"].gave_up else "")
