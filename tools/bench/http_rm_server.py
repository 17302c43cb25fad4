"""An HTTP reward server in the style of OpenRLHF's `serve_rm` (the benchmark's baseline (d)).

As there: FastAPI + uvicorn, `POST /get_reward` with `{"query": [text, ...]}` answers `{"rewards": [...]}`, the
texts are tokenized with padding and scored by one torch forward per request (in chunks of `--batch-size` when
given), inside the async handler, so requests are served one at a time. Differences, both so that scores can be
compared with the other backends to 1e-4: the model runs in float32 unless `--dtype bfloat16` (OpenRLHF's default is
bf16; `templar bench --http-dtype`), and the text is
used exactly as the RM's own chat template rendered it (serve_rm strips and re-appends the EOS string and lets the
tokenizer add a BOS, which changes the tokens of templated text).

Run it as `python -m templar.tools.bench.http_rm_server --model DIR --port 5000`; `HttpRewardServer` starts it in a
separate process (so the benchmark's client does not share an interpreter with it) and waits until it answers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from fastapi import FastAPI, Request  # module level: FastAPI resolves the handler's annotations here
from fastapi.responses import JSONResponse

from templar.server.ports import DEFAULT_HOST, free_port
from templar.server.embedded import die_with_parent
from templar.environment import use_offline_defaults


def create_app(model_dir: str | Path, *, max_length: int, batch_size: int | None,
               template_kwargs: dict | None, dtype: str = "float32") -> FastAPI:
    from templar.tools.bench.torch_rm import TorchRewardModel

    model = TorchRewardModel(model_dir, max_length=max_length, template_kwargs=template_kwargs, dtype=dtype)
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": str(model_dir), "kind": model.kind}

    @app.post("/get_reward")
    async def get_reward(request: Request):
        try:
            data = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        queries = data.get("query") if isinstance(data, dict) else None
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries) or not queries:
            return JSONResponse({"error": 'expected {"query": [text, ...]} with at least one text'}, status_code=400)
        # Blocking on purpose: serve_rm runs the forward inside the handler, one request at a time.
        rewards = model.score_texts(queries, batch_size).tolist()
        return JSONResponse({"rewards": rewards})

    return app


class ChildHttpServer:
    """A server in a child process that answers GET /health once it is up; a context manager. Subclasses give the
    command, its environment and their error messages (the benchmark's HTTP server here, vLLM in vllm_server)."""

    poll_s = 0.25  # between /health probes while starting
    stop_grace_s = 20.0  # SIGTERM, then SIGKILL after this long

    def __init__(self, *, host: str, port: int | None, startup_timeout_s: float, log_file: Path | None) -> None:
        self.host, self.port = host, port or free_port(host)
        self.startup_timeout_s, self.log_file = startup_timeout_s, log_file
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def exited_error(self, code: int) -> Exception:
        return RuntimeError(f"the server exited with code {code} while starting")

    def timeout_error(self) -> Exception:
        return RuntimeError(f"the server did not answer within {self.startup_timeout_s:.0f}s")

    def start(self):
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.environment(),
                                            preexec_fn=die_with_parent)
        finally:
            if self.log_file:
                log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self.exited_error(self.process.returncode)
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(self.poll_s)
        self.stop()
        raise self.timeout_error()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


class HttpRewardServer(ChildHttpServer):
    """The OpenRLHF-style server in a child process; a context manager."""

    def __init__(self, model_dir: str | Path, *, max_length: int = 4096, batch_size: int | None = None,
                 template_kwargs: dict | None = None, host: str = DEFAULT_HOST, port: int | None = None,
                 startup_timeout_s: float = 300.0, log_file: str | Path | None = None, dtype: str = "float32") -> None:
        super().__init__(host=host, port=port, startup_timeout_s=startup_timeout_s,
                         log_file=Path(log_file) if log_file else None)
        self.model_dir = Path(model_dir)
        self.args = ["--model", str(self.model_dir), "--host", host, "--port", str(self.port),
                     "--max-len", str(max_length), "--template-kwargs", json.dumps(template_kwargs or {}),
                     "--dtype", dtype]
        if batch_size:
            self.args += ["--batch-size", str(batch_size)]

    def command(self) -> list[str]:
        return [sys.executable, "-m", "templar.tools.bench.http_rm_server", *self.args]

    def environment(self) -> dict[str, str]:
        return use_offline_defaults(dict(os.environ))

    def exited_error(self, code: int) -> Exception:
        return RuntimeError(f"the HTTP reward server exited with code {code} while starting (log: "
                            f"{self.log_file or 'not kept'})")

    def timeout_error(self) -> Exception:
        return RuntimeError(f"the HTTP reward server did not answer within {self.startup_timeout_s:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m templar.tools.bench.http_rm_server",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="Hugging Face reward model folder")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=None, help="texts per forward (default: the request)")
    parser.add_argument("--template-kwargs", type=json.loads, default={})
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="what the model computes in (OpenRLHF serve_rm's default: bfloat16)")
    args = parser.parse_args(argv)
    use_offline_defaults()
    import uvicorn

    app = create_app(args.model, max_length=args.max_len, batch_size=args.batch_size,
                     template_kwargs=args.template_kwargs, dtype=args.dtype)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
