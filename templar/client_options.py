"""The reward client's options (templar.reward_client.RewardClientConfig) at every entrance that is not Python code
building the dataclass: command-line flags GENERATED from it (a flag per field, named after it; its help is the
field's comment, its default the dataclass's), environment variables (OpenRLHF's reward-function file) and keyword
arguments (TRL's `TemplarReward`, verl's `reward_kwargs`) checked against its fields. A field added to the dataclass
appears in every command and integration, or tests/test_client_options.py fails.

Commands built on the reward client take every option (`EVERY`). The load tools send raw requests on purpose (they
measure the server: no retries, no balancing) and take the options that say how to reach it (`CONNECTION`); they
read `rows_per_request` as their request size.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from templar import wire
from templar.errors import ConfigError
from templar.field_docs import field_docs
from templar.reward_client import RewardClientConfig

TLS = ("tls", "tls_ca", "tls_cert", "tls_key")
# how to reach a server: every command that talks to one takes these
CONNECTION = ("endpoints", *TLS, "headers", "compression", "request_timeout_s", "connect_timeout_s")
# what the reward client does on top: request sizes, concurrency, retries, fail-over, fingerprint checks
SCORING = ("rows_per_request", "max_in_flight", "max_attempts", "backoff_base_s", "backoff_max_s",
           "endpoint_cooldown_s", "dns_refresh_s", "expected_fingerprints")
EVERY = CONNECTION + SCORING
NAMED_APART = ("model",)  # every command and integration names its reward model(s) its own way
ENV_PREFIX = "TEMPLAR_"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def flag(name: str) -> str:
    """The command-line flag of a field: `--url` for the endpoints (the name users know), one `--header` per entry
    of a dict field, otherwise the field's name (`--request-timeout-s`)."""
    if name == "endpoints":
        return "--url"
    kind = _kind(name)
    return "--" + (name.removesuffix("s") if kind is dict else name).replace("_", "-")


def env_var(name: str) -> str:
    """The environment variable of a field: TEMPLAR_URL for the endpoints, otherwise TEMPLAR_<FIELD>."""
    return ENV_PREFIX + ("URL" if name == "endpoints" else name.upper())


def _kind(name: str) -> type:
    """bool, int, float, str, list (the endpoints) or dict, from the field's type (`str | None` -> str)."""
    hint = typing.get_type_hints(RewardClientConfig)[name]
    origin = typing.get_origin(hint)
    if origin in (list, dict):
        return origin
    options = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    return options[0]


@dataclass(frozen=True)
class ClientFlags:
    """The client flags of one command: `add(parser)` generates them, `config(args, model=...)` builds the
    RewardClientConfig back from what was parsed."""

    fields: tuple[str, ...] = EVERY  # the options this command takes (CONNECTION for the load tools)
    defaults: RewardClientConfig = field(default_factory=RewardClientConfig)  # this command's defaults
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # field -> older flags kept working
    helps: Mapping[str, str] = field(default_factory=dict)  # field -> this command's own words, for the field's doc

    def add(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("reward client", "how to reach the reward server and ask it (the fields "
                                          "of templar.reward_client.RewardClientConfig)")
        docs = field_docs(RewardClientConfig)
        for name in self.fields:
            group.add_argument(flag(name), *self.aliases.get(name, ()), dest=name, **self._argument(name, docs[name]))

    def _argument(self, name: str, doc: str) -> dict[str, Any]:
        kind, default = _kind(name), getattr(self.defaults, name)
        own = name in self.helps
        doc = self.helps.get(name, doc).replace("%", "%%")
        if kind is bool:
            return {"action": "store_true", "default": default, "help": doc}
        if kind is dict:
            return {"action": "append", "default": None, "metavar": "KEY=VALUE",
                    "help": f"{doc} (one {flag(name)} per entry)"}
        if kind is list:
            several = "" if own else "; comma-separated for several"
            shown = f" (default: {','.join(default)})" if default else ""
            return {"default": ",".join(default) or None, "metavar": "HOST:PORT" if own else "HOST:PORT[,...]",
                    "help": doc + several + shown}
        extra = {"choices": ("gzip", "deflate")} if name == "compression" else \
            {"metavar": "SECONDS" if name.endswith("_s") else "N"} if kind in (int, float) else {}
        shown = "" if default is None else " (default: %(default)s)"
        return {"type": kind, "default": default, "help": doc + shown, **extra}

    def config(self, args: argparse.Namespace, **overrides: Any) -> RewardClientConfig:
        """The options as parsed (this command's defaults for the rest), with `overrides` (e.g. model=...)."""
        values = {}
        for name in self.fields:
            value, kind = getattr(args, name), _kind(name)
            if kind is list:
                value = wire.parse_endpoints(value, flag(name)) if value else list(self.defaults.endpoints)
            elif kind is dict:
                value = {**getattr(self.defaults, name), **key_values(value or [], flag(name))}
            values[name] = value
        return dataclasses.replace(self.defaults, **values, **overrides)


def key_values(items: Sequence[str], what: str) -> dict[str, str]:
    """["KEY=VALUE", ...] -> {KEY: VALUE}; `what` names the flag or variable in errors."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} takes KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def from_text(name: str, text: str, what: str) -> Any:
    """A field's value from text (an environment variable's), converted to the field's type."""
    kind = _kind(name)
    if kind is bool:
        if text.strip().lower() not in TRUE + FALSE:
            raise ConfigError(f"{what} must be one of {', '.join(TRUE)} or {', '.join(FALSE[:-1])}, got {text!r}")
        return text.strip().lower() in TRUE
    if kind is list:
        return wire.parse_endpoints(text, what)
    if kind is dict:
        return key_values([part for part in text.split(",") if part.strip()], what)
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{what} must be {kind.__name__}, got {text!r}") from None


def from_environment(environ: Mapping[str, str], defaults: RewardClientConfig | None = None) -> RewardClientConfig:
    """The options from TEMPLAR_URL, TEMPLAR_TLS, TEMPLAR_TLS_CA, ... (`env_var` of every field); unset ones keep
    their defaults. Dict fields take KEY=VALUE[,KEY=VALUE...]."""
    values = {name: from_text(name, environ[env_var(name)], env_var(name)) for name in EVERY
              if env_var(name) in environ}
    return dataclasses.replace(defaults or RewardClientConfig(), **values)


def from_keywords(options: Mapping[str, Any], what: str, defaults: RewardClientConfig | None = None,
                  ) -> RewardClientConfig:
    """The options from keyword arguments named as the fields (`url` is the endpoints, as a text or a list);
    `what` names the caller in the error an unknown name gets."""
    options = dict(options)
    if "url" in options:
        if "endpoints" in options:
            raise ConfigError(f"{what}: give url or endpoints, not both")
        options["endpoints"] = options.pop("url")
    unknown = sorted(set(options) - set(EVERY))
    if unknown:
        named = " (named by its own argument)" if set(unknown) & set(NAMED_APART) else ""
        raise ConfigError(f"{what}: unknown option(s) {', '.join(unknown)}{named}; the reward client's options are "
                          f"url and {', '.join(n for n in EVERY if n != 'endpoints')}")
    values = {}
    for name, value in options.items():
        kind = _kind(name)
        if kind is list:
            value = wire.parse_endpoints(value, f"{what}: url")
        elif kind is dict:
            value = dict(value)  # a Hydra DictConfig (verl), or any mapping
        elif isinstance(value, str) and kind is not str:
            value = from_text(name, value, f"{what}: {name}")
        values[name] = value
    return dataclasses.replace(defaults or RewardClientConfig(), **values)
