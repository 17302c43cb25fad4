"""The wheel installs (issue 21 §1): `pip wheel .`, installed (not editable) into a scratch venv that sees none of the
source tree, gives a working `templar`: its help, an export of a tiny RM, the embedded server on it, and a score.

The scratch venv borrows the project venv's third-party packages through a path file (so torch is not installed
twice); that folder's own path files are not processed from there, so the project's editable install stays out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from templar.server.embedded import die_with_parent
from templar.server.ports import free_server_ports

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def run(command: list[str], cwd: Path, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A scratch venv with the built wheel installed: its bin/ folder."""
    work = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work / "dist"),
         str(ROOT)], cwd=work)
    (wheel,) = (work / "dist").glob("templar_rlhf-*.whl")
    venv = work / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=work)
    scratch_site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (scratch_site / "project-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=work)
    return venv / "bin"


def test_the_wheel_alone_exports_serves_and_scores(installed, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{installed}{os.pathsep}{env.get('PATH', '')}"
    python, templar = str(installed / "python"), str(installed / "templar")
    where = run([python, "-c", "import json, importlib.resources, templar, templar.trainer, templar.tools; "
                 "print(json.dumps([templar.__file__, templar.trainer.__file__, templar.tools.__file__, "
                 "(importlib.resources.files('templar.data') / 'demo_prompts.jsonl').is_file()]))"],
                cwd=tmp_path, env=env)
    *files, prompts = json.loads(where.stdout)
    assert all(str(installed.parent) in f and str(ROOT) not in f for f in files), files  # the wheel's, not the tree's
    assert prompts, "the built-in prompts (templar/data) are not in the wheel"
    help_text = run([templar, "--help"], cwd=tmp_path, env=env).stdout
    assert "export" in help_text and "serve" in help_text and "train" in help_text
    run([templar, "tiny-model", "--family", "llama3_1", "--out", str(tmp_path / "rm")], cwd=tmp_path, env=env)
    run([templar, "export", "--model", str(tmp_path / "rm"), "--name", "rm_wheel", "--repo", str(tmp_path / "repo"),
         "--max-length", "256"], cwd=tmp_path, env=env)
    ports = free_server_ports()
    server = subprocess.Popen([templar, "serve", "--repo", str(tmp_path / "repo"), "--grpc-port",
                               str(ports["grpc_port"]), "--http-port", str(ports["http_port"]), "--metrics-port",
                               str(ports["metrics_port"])], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, preexec_fn=die_with_parent)
    try:
        for line in server.stdout:  # `templar serve` prints its endpoints once every model is ready, then this
            if "Ctrl-C stops it" in line:
                break
        assert server.poll() is None, "templar serve from the wheel exited"
        data = tmp_path / "rows.jsonl"
        data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": "Hello!"}]}) + "\n")
        scored = run([templar, "score", "--url", f"127.0.0.1:{ports['grpc_port']}", "--model", "rm_wheel", "--data",
                      str(data)], cwd=tmp_path, env=env)
        assert "1 rows, 0 failed" in scored.stderr and " ok" in scored.stdout
    finally:
        server.terminate()
        server.wait(timeout=120)
