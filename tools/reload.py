"""`templar reload`: swap a served RM to a newly exported version (`templar export --version N`) without failing a
request, then unload the old version (templar.server.hot_swap). The server needs model control (`templar serve
--model-control`); the admin key comes from $TEMPLAR_ADMIN_KEY."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from templar.server.embedded import ADMIN_KEY_ENV
from templar.server.hot_swap import ReloadOptions, reload_model
from templar.wire import TlsSettings


def add_arguments(parser) -> None:
    d = ReloadOptions
    parser.add_argument("--model", required=True, help="the RM's name (its entry model)")
    parser.add_argument("--version", type=int, help="the version to serve (default: the newest in --repo)")
    parser.add_argument("--url", default=d.url, help="the server's gRPC endpoint (default: %(default)s)")
    parser.add_argument("--repo", type=Path, default=d.repo,
                        help="the model repository the server reads (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=d.timeout_s,
                        help="seconds for each load, and for the old version to finish its requests "
                             "(default: %(default)s)")
    parser.add_argument("--tls", action="store_true", help="gRPC over TLS (the system's CAs unless --tls-ca)")
    parser.add_argument("--tls-ca", help="PEM file of the CA that signed the server's certificate")
    parser.add_argument("--tls-cert", help="this client's certificate (PEM), for a server that demands one")
    parser.add_argument("--tls-key", help="this client's key (PEM)")
    parser.epilog = f"The admin key is read from ${ADMIN_KEY_ENV}."


def main(args) -> int:
    tls = TlsSettings(args.tls_ca, args.tls_cert, args.tls_key) \
        if args.tls or args.tls_ca or args.tls_cert or args.tls_key else None
    opts = ReloadOptions(model=args.model, version=args.version, url=args.url, repo=args.repo, tls=tls,
                         timeout_s=args.timeout)
    report = reload_model(opts, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"{report.model}: serving version {report.version} (loaded {', '.join(report.loaded) or 'nothing'}; "
          f"unloaded {', '.join(report.unloaded) or 'nothing'}) in {report.seconds:.1f}s")
    print(json.dumps({"fingerprints": report.fingerprints}))
    return 0
