"""`templar hostile`: a hostile-input campaign against a served RM, over real gRPC.

`hostile_rows()` makes rows that try to break the served path: not JSON, empty, invalid UTF-8, lone surrogates, wrong
JSON types at every level, JSON nested 100k deep, megabyte-sized content, thousands of messages, NUL bytes, the RM
family's control-token strings, Jinja inside content, template_kwargs that try to override what the serving side
sets (messages, bos_token, add_generation_prompt, ...), a conversation without an assistant turn and an
assistant-only one. `run_campaign()` scatters good conversations among them in requests of mixed sizes and checks
what must hold: every row gets exactly the answer it gets when sent alone (good rows their score, hostile rows their
per-row error or, where still a valid conversation, their score), no request fails as a whole, the server stays ready;
it reports the server's resident memory before and after. The server is reached as the client flags say (TLS,
headers, compression, the request deadline), with no retries: a request failing is what the campaign counts.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from templar import contract, wire
from templar.client_options import CONNECTION, ClientFlags
from templar.reward_client import RewardClientConfig
from templar.samples import sample_conversations

GOOD_SHARE = 1 / 3
# how to reach the server; the campaign plans its own request sizes. A long deadline: rows of a megabyte each
CLIENT_DEFAULTS = RewardClientConfig(request_timeout_s=300.0)
CLIENT_FLAGS = ClientFlags(fields=CONNECTION, defaults=CLIENT_DEFAULTS,
                           helps={"endpoints": "the server's gRPC endpoint, host:port (the one the campaign checks)"})


@dataclass(frozen=True)
class Row:
    kind: str  # what the row tries (or "good:<name>")
    data: bytes  # the wire row


def _conversation(*messages: tuple[str, str], **extra) -> bytes:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in messages], **extra}).encode()


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


QA = (("user", "What is 2 + 2?"), ("assistant", "4."))


def wrong_types() -> list[Row]:
    """Wrong JSON types at every level: the row, messages, a message, role, content, tools, template_kwargs."""
    rows = {"row:list": b"[]", "row:number": b"7", "row:null": b"null", "row:string": b'"hi"',
            "row:no_messages": b'{"conversation": []}'}
    for name, value in {"object": {}, "string": "hi", "empty": [], "number": 3, "null": None}.items():
        rows[f"messages:{name}"] = json.dumps({"messages": value}).encode()
    for name, value in {"string": "hi", "list": ["user", "hi"], "null": None}.items():
        rows[f"message:{name}"] = json.dumps({"messages": [value, {"role": "assistant", "content": "x"}]}).encode()
    rows["message:no_role"] = json.dumps({"messages": [{"content": "x"}]}).encode()
    rows["message:no_content"] = json.dumps({"messages": [{"role": "assistant"}]}).encode()
    for name, value in {"number": 1, "null": None, "unknown": "admin", "tool": "tool", "list": ["user"],
                        "long": "u" * 10_000}.items():
        rows[f"role:{name}"] = json.dumps({"messages": [{"role": value, "content": "x"}]}).encode()
    for name, value in {"list": ["a"], "null": None, "number": 1.5, "object": {"text": "x"}}.items():
        rows[f"content:{name}"] = json.dumps({"messages": [{"role": "assistant", "content": value}]}).encode()
    for name, value in {"object": {"a": 1}, "strings": ["a"], "number": 2}.items():
        rows[f"tools:{name}"] = _conversation(*QA, tools=value)
    for name, value in {"list": [1], "string": "x", "number": 0}.items():
        rows[f"template_kwargs:{name}"] = _conversation(*QA, template_kwargs=value)
    return [Row(kind, data) for kind, data in rows.items()]


def deep_and_big(big_bytes: int) -> list[Row]:
    """Nesting 100k deep, megabyte content, thousands of messages (over and under the default limits)."""
    deep = 100_000
    rows = {
        "nested_100k:messages": b'{"messages": ' + b"[" * deep + b"]" * deep + b"}",
        "nested_100k:tools": b'{"messages": [{"role": "assistant", "content": "x"}], "tools": ' + b"[" * deep
                             + b"]" * deep + b"}",
        "nested_100k:objects": b'{"messages": [], "k": ' + b'{"a": ' * deep + b"1" + b"}" * deep + b"}",
        "nested_200:template_kwargs": _conversation(*QA, template_kwargs=_nested(200)),
        "content:over_limit": _conversation(("user", "x" * big_bytes), ("assistant", "ok")),
        "content:megabyte": _conversation(("user", "The fox jumps. " * (900_000 // 15)), ("assistant", "ok")),
        "messages:5000": _conversation(*[("user" if i % 2 == 0 else "assistant", "hi") for i in range(5000)]),
        "messages:1000": _conversation(*[("user" if i % 2 == 0 else "assistant", "hi") for i in range(1000)]),
    }
    return [Row(kind, data) for kind, data in rows.items()]


def _nested(levels: int) -> dict:
    value: dict = {"v": 1}
    for _ in range(levels):
        value = {"v": value}
    return value


def encoding_and_text(control_tokens: Sequence[str]) -> list[Row]:
    """Bytes that are not UTF-8 or JSON, and content that tries to pass for template structure or code."""
    jinja = "{{ 7 * 7 }} {% for i in range(10**9) %}x{% endfor %} {{ ''.__class__.__mro__[1].__subclasses__() }}"
    rows = {
        "not_json": b"this is not JSON {", "empty": b"", "bom": b"\xef\xbb\xbf" + _conversation(*QA),
        "invalid_utf8": b'{"messages": [{"role": "user", "content": "\xff\xfe\xfd"}]}',
        "truncated_utf8": _conversation(*QA)[:-3] + b"\xe2\x82",
        "lone_surrogate:escaped": _raw('{"messages": [{"role": "user", "content": "\\ud800"}, '
                                       '{"role": "assistant", "content": "x"}]}'),
        "lone_surrogate:raw": _raw('{"messages": [{"role": "user", "content": "\ud800"}]}'),
        "nul_bytes": _conversation(("user", "a\x00b\x00\x00"), ("assistant", "\x00 ok \x00")),
        "jinja_in_content": _conversation(("user", jinja), ("assistant", "{% raw %}{{ messages }}{% endraw %}")),
        "control_tokens": _conversation(("user", " ".join(control_tokens) or "<|x|>"),
                                        ("assistant", "fine " + "".join(control_tokens))),
        "control_tokens_in_kwargs": _conversation(*QA, template_kwargs={"date_string": "".join(control_tokens)}),
        "no_assistant_turn": _conversation(("user", "hello?")),
        "ends_with_user": _conversation(*QA, ("user", "and?")),
        "assistant_only": _conversation(("assistant", "I speak first.")),
        "unknown_fields": _conversation(*QA, extra={"x": [1, 2]}, priority=99),
        "duplicate_keys": b'{"messages": 1, ' + _conversation(*QA)[1:],
        "nan_in_kwargs": _conversation(*QA)[:-1] + b', "template_kwargs": {"x": NaN}}',
    }
    for key in ("messages", "bos_token", "eos_token", "add_generation_prompt", "tools", "raise_exception"):
        rows[f"override:{key}"] = _conversation(*QA, template_kwargs={key: "<|begin_of_text|>"})
    return [Row(kind, data) for kind, data in rows.items()]


def hostile_rows(control_tokens: Sequence[str] = (), big_bytes: int = 1_500_000) -> list[Row]:
    """Every hostile row, once (`big_bytes`: the size of the row that is over the default 1 MiB limit)."""
    return wrong_types() + deep_and_big(big_bytes) + encoding_and_text(control_tokens)


def good_rows() -> list[Row]:
    """Ordinary conversations (with and without system prompt, several lengths) for scattering among the others."""
    rows = [Row(f"good:{name}", json.dumps({"messages": messages}).encode())
            for name, messages in sample_conversations(long_words=200).items()]
    for i in range(40):
        rows.append(Row(f"good:qa{i}", _conversation(("user", f"Question {i}: what is {i} + {i}?"),
                                                     ("assistant", f"It is {2 * i}." + " Sure." * (i % 7)))))
    return rows


# -- the campaign -----------------------------------------------------------------------------------------------------
EXPENSIVE_BYTES = 64 * 1024  # rows this big appear at most `max_expensive` times each: they cost transfer and time
Answer = tuple[str, float]  # (status, score)


@dataclass
class CampaignReport:
    rows: int = 0
    good_rows: int = 0
    hostile_rows: int = 0
    hostile_kinds: int = 0
    requests: int = 0
    request_sizes: dict[str, int] = field(default_factory=dict)
    requests_failed: int = 0  # requests that failed as a whole
    rows_mismatched: int = 0  # rows whose answer differs from the one they get alone
    max_score_diff: float = 0.0  # largest |score - score alone| over rows scored
    hostile_scored: int = 0  # hostile rows that are still valid conversations, scored
    hostile_refused: int = 0  # hostile rows answered with a per-row error
    server_ready_after: bool = False
    seconds: float = 0.0
    rss_mib_before: float | None = None  # the server's resident memory (process tree), when known
    rss_mib_after: float | None = None
    examples: list[str] = field(default_factory=list)  # the first mismatches and failures

    @property
    def holds(self) -> bool:
        return self.requests_failed == 0 and self.rows_mismatched == 0 and self.server_ready_after


def _infer(client, options: RewardClientConfig, rows: Sequence[Row]) -> list[Answer]:
    result = wire.decode_entry(client.infer(options.model, wire.conversation_inputs([r.data for r in rows]),
                                            outputs=wire.requested_outputs(), client_timeout=options.request_timeout_s,
                                            headers=options.headers or None,
                                            compression_algorithm=options.compression))
    return [(status, float(score)) for status, score in zip(result.status, result.scores)]


def answers_alone(client, options: RewardClientConfig, rows: Sequence[Row]) -> dict[bytes, Answer]:
    """Each distinct row's answer when it is the only row of its request: the reference."""
    return {row.data: _infer(client, options, [row])[0] for row in rows}


def plan_requests(good: Sequence[Row], hostile: Sequence[Row], total_rows: int, rng: random.Random, *,
                  max_rows: int = 256, max_request_bytes: int = 32 << 20, max_expensive: int = 5) -> list[list[Row]]:
    """`total_rows` rows, a third good, in requests of 1, 2-8, 9-64 or 65-`max_rows` rows (each under
    `max_request_bytes`); each expensive hostile row at most `max_expensive` times."""
    cheap = [r for r in hostile if len(r.data) <= EXPENSIVE_BYTES]
    stream = [r for r in hostile if len(r.data) > EXPENSIVE_BYTES for _ in range(max_expensive)]
    stream += [rng.choice(good) if rng.random() < GOOD_SHARE else rng.choice(cheap)
               for _ in range(total_rows - len(stream))]
    rng.shuffle(stream)
    requests, i = [], 0
    while i < len(stream):
        size = rng.choice([1, rng.randint(2, 8), rng.randint(9, 64), rng.randint(65, max_rows)])
        request, used = [], 0
        for row in stream[i : i + size]:
            if request and used + len(row.data) > max_request_bytes:
                break
            request.append(row)
            used += len(row.data)
        requests.append(request)
        i += len(request)
    return requests


def _size_bucket(rows: int) -> str:
    return "1" if rows == 1 else "2-8" if rows <= 8 else "9-64" if rows <= 64 else "65+"


def _check(report: CampaignReport, rows: Sequence[Row], got: Sequence[Answer], alone: dict[bytes, Answer]) -> None:
    for row, (status, score) in zip(rows, got):
        want_status, want_score = alone[row.data]
        same = status == want_status and (not contract.is_ok(status) or abs(score - want_score) <= 1e-5)
        if contract.is_ok(status):
            report.max_score_diff = max(report.max_score_diff, abs(score - want_score))
        if not same:
            report.rows_mismatched += 1
            if len(report.examples) < 10:
                report.examples.append(f"{row.kind}: got ({status[:120]!r}, {score}), alone "
                                       f"({want_status[:120]!r}, {want_score})")
        if not row.kind.startswith("good:"):
            report.hostile_scored += contract.is_ok(status)
            report.hostile_refused += not contract.is_ok(status)


def run_campaign(options: RewardClientConfig, *, total_rows: int = 10_000, seed: int = 0, concurrency: int = 4,
                 control_tokens: Sequence[str] = (), rss_mib=None, progress=lambda _: None) -> CampaignReport:
    """The campaign (module docstring) against `options.model` at its first endpoint. `rss_mib`: a function giving
    the server's resident memory, if known."""
    import concurrent.futures

    options = dataclasses.replace(options).check("templar hostile")
    client = wire.sync_client(options.endpoints[0], tls=options.tls_settings())
    good, hostile = good_rows(), hostile_rows(control_tokens)
    alone = answers_alone(client, options, good + hostile)
    report = CampaignReport(hostile_kinds=len(hostile))
    report.rss_mib_before = rss_mib() if rss_mib else None
    requests = plan_requests(good, hostile, total_rows, random.Random(seed))
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = {pool.submit(_infer, client, options, rows): rows for rows in requests}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            rows = futures[future]
            bucket = _size_bucket(len(rows))
            report.request_sizes[bucket] = report.request_sizes.get(bucket, 0) + 1
            report.requests += 1
            report.rows += len(rows)
            report.good_rows += sum(r.kind.startswith("good:") for r in rows)
            try:
                _check(report, rows, future.result(), alone)
            except Exception as exc:  # noqa: BLE001 - a request failing as a whole is what the campaign counts
                report.requests_failed += 1
                report.examples.append(f"request of {len(rows)} rows failed: {wire.error_message(exc)[:300]}")
            if done % 50 == 0:
                progress(f"{done}/{len(requests)} requests, {report.rows} rows")
    report.seconds = time.perf_counter() - started
    report.hostile_rows = report.rows - report.good_rows
    headers = options.headers or None
    report.server_ready_after = client.is_server_ready(headers=headers) and \
        client.is_model_ready(options.model, headers=headers)
    report.rss_mib_after = rss_mib() if rss_mib else None
    return report


def process_tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and its descendants (tritonserver and its Python-backend stubs), MiB."""
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


# -- CLI --------------------------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="reward model name")
    parser.add_argument("--rows", type=int, default=10_000, help="rows in all (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--control-tokens", default="<|begin_of_text|>,<|eot_id|>,<|start_header_id|>",
                        help="the RM family's control-token strings, comma-separated (default: Llama-3's)")
    parser.add_argument("--server-pid", type=int, help="tritonserver's pid, to report its resident memory")
    parser.add_argument("--out", type=Path, help="JSON report")
    CLIENT_FLAGS.add(parser)


def main(args) -> int:
    rss = (lambda: process_tree_rss_mib(args.server_pid)) if args.server_pid else None
    report = run_campaign(CLIENT_FLAGS.config(args, model=args.model), total_rows=args.rows, seed=args.seed,
                          concurrency=args.concurrency, rss_mib=rss,
                          control_tokens=[t for t in args.control_tokens.split(",") if t],
                          progress=lambda m: print(m, file=sys.stderr, flush=True))
    text = json.dumps({**asdict(report), "holds": report.holds}, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report.holds else 1
