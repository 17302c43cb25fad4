"""`templar reload`: swap a served RM to a newly exported version (`templar export --version N`) without failing a
request, then unload the old version (templar.server.hot_swap). The server needs model control (`templar serve
--model-control`); the admin key comes from $TEMPLAR_ADMIN_KEY."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from templar.client_options import TLS, ClientFlags
from templar.errors import ConfigError
from templar.server.embedded import ADMIN_KEY_ENV
from templar.server.hot_swap import ReloadOptions, reload_model

# model control talks to one server, with the admin key as its only header: the endpoint and TLS
CLIENT_FLAGS = ClientFlags(fields=("endpoints", *TLS),
                           helps={"endpoints": "the server's gRPC endpoint, host:port (the one that swaps the RM)"})


def add_arguments(parser) -> None:
    d = ReloadOptions
    parser.add_argument("--model", required=True, help="the RM's name (its entry model)")
    parser.add_argument("--version", type=int, help="the version to serve (default: the newest in --repo)")
    parser.add_argument("--repo", type=Path, default=d.repo,
                        help="the model repository the server reads (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=d.timeout_s,
                        help="seconds for each load, and for the old version to finish its requests "
                             "(default: %(default)s)")
    CLIENT_FLAGS.add(parser)
    parser.epilog = f"The admin key is read from ${ADMIN_KEY_ENV}."


def main(args) -> int:
    client = CLIENT_FLAGS.config(args, model=args.model).check("templar reload")
    if len(client.endpoints) != 1:
        raise ConfigError(f"templar reload swaps the RM on one server: give one --url, got "
                          f"{', '.join(client.endpoints)}")
    opts = ReloadOptions(model=args.model, version=args.version, url=client.endpoints[0], repo=args.repo,
                         tls=client.tls_settings(), timeout_s=args.timeout)
    report = reload_model(opts, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"{report.model}: serving version {report.version} (loaded {', '.join(report.loaded) or 'nothing'}; "
          f"unloaded {', '.join(report.unloaded) or 'nothing'}) in {report.seconds:.1f}s")
    print(json.dumps({"fingerprints": report.fingerprints}))
    return 0
