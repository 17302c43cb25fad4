"""The layers, read from the source with `ast`: `templar/` (the library) <- `trainer/` (the PPO trainer) <- `tools/`
(command lines), with `templar/cli.py` (the entry point) above them all. A new import that points the wrong way, a
private name used across modules, or a function grown past the limit fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package it installs as (pyproject.toml, [tool.setuptools.package-dir])
PACKAGES = {"templar": "templar", "trainer": "templar.trainer", "tools": "templar.tools"}
LAYERS = {"library": 0, "trainer": 1, "tools": 2, "entry": 3}
MAX_FUNCTION_LINES = 60


def layer(module: str) -> str:
    if module == "templar.cli":
        return "entry"
    if module == "templar.trainer" or module.startswith("templar.trainer."):
        return "trainer"
    if module == "templar.tools" or module.startswith("templar.tools."):
        return "tools"
    return "library"


def modules() -> dict[str, Path]:
    """Every project module: dotted name -> file."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports(path: Path, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported templar module, names taken from it) for every import of a templar module in a file."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "templar"]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            if target.split(".")[0] == "templar":
                found.append((node.lineno, target, [a.name for a in node.names]))
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        targets = set()
        for _, target, names in imports(path, module):
            # `from templar import contract` names a module; `from templar.x import y` may name one too
            targets |= {f"{target}.{n}" for n in names if f"{target}.{n}" in known} or {target}
        graph[module] = targets
    return graph


def test_the_scan_sees_the_layout():
    graph = import_graph()
    assert {"templar.contract", "templar.reward_client", "templar.trainer.train", "templar.tools.export",
            "templar.serving.reward_entry", "templar.export.exporter"} <= set(graph)
    assert "templar.trainer.train" in graph["templar.tools.train"]  # the scan does find imports


def test_dependencies_point_one_way():
    wrong = []
    for module, targets in import_graph().items():
        for target in targets:
            if LAYERS[layer(target)] > LAYERS[layer(module)]:
                wrong.append(f"{module} ({layer(module)}) imports {target} ({layer(target)})")
    assert not wrong, "imports against the layers templar <- trainer <- tools <- cli:\n" + "\n".join(sorted(wrong))


def test_no_private_name_crosses_a_module():
    known = modules()
    crossings = []
    for module, path in known.items():
        for line, target, names in imports(path, module):
            crossings += [f"{path.relative_to(ROOT)}:{line} takes {name} from {target}" for name in names
                          if name.startswith("_") and name != "__version__"]
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for a in node.names if a.name.startswith("templar")}
        aliases |= {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and (node.module or "").startswith("templar") for a in node.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                crossings.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not crossings, "\n".join(crossings)


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_no_long_functions(folder):
    long = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named phases):\n" + "\n".join(long)


def test_the_generated_model_files_import_only_the_library():
    """Triton loads these modules from the thin generated model.py files; they must need nothing above templar/."""
    graph = import_graph()
    for module in ("templar.serving.preprocess", "templar.serving.reward_entry", "templar.serving.onnx_scorer",
                   "templar.serving.packed_scorer", "templar.serving.torch_scorer"):
        assert all(layer(t) == "library" for t in graph[module]), graph[module]


def readme_folder_rows() -> dict[str, str]:
    """`folder/` -> its row of the README's folder table."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| folder | what it holds |"):]
    table = table[: table.index("\n\n")]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w/]+/)` \| (.*) \|$", table, re.MULTILINE)}


def test_the_readme_folder_table_names_every_module():
    rows = readme_folder_rows()
    for folder in ("templar/", "templar/export/", "templar/serving/", "templar/server/", "templar/integrations/",
                   "trainer/", "tools/", "tools/bench/"):
        assert folder in rows, f"README's folder table has no row for {folder}"
        named = set(re.findall(r"`(\w+\.py)`", rows[folder]))
        present = {p.name for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py"}
        assert named == present, f"{folder}: missing {sorted(present - named)}, gone {sorted(named - present)}"


# Paths that look like repository files but are not (a folder inside an exported model, an example, a metric key)
NOT_FILES = {"configs/embedded.pbtxt", "configs/my.yaml", "templar/failed", "templar/tools", "templar/trainer"}
NOT_MODULES = {"templar.log"}  # a log file's name


def test_file_and_module_references_in_docs_and_comments_exist():
    """Every `folder/file` path and every `templar.x.y` module named in the docs, the comments and the configs is
    one that exists (a module: importable, or an attribute of one)."""
    import importlib

    files = [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("templar/**/*.py"), *ROOT.glob("trainer/*.py"),
             *ROOT.glob("tools/**/*.py"), *ROOT.glob("configs/*.yaml"), ROOT / "Makefile", ROOT / "docker-compose.yml",
             *ROOT.glob("docker/*")]
    path_ref = re.compile(r"(?<![\w./-])((?:templar|trainer|tools|tests|docs|configs|docker|model_repository)/"
                          r"[\w./-]*\w)")
    module_ref = re.compile(r"(?<![\w./-])(templar(?:\.[a-z_]\w*)+)")
    loggers = {name for file in files for name in re.findall(r"getLogger\([\"'](templar[\w.]*)", file.read_text())}
    known = modules()
    missing = set()
    for file in files:
        text = file.read_text(errors="ignore")
        for ref in path_ref.findall(text):
            if ref not in NOT_FILES and not (ROOT / ref).exists():
                missing.add(f"{file.relative_to(ROOT)}: {ref}")
        for ref in set(module_ref.findall(text)) - loggers - NOT_MODULES:
            if ref not in known and not _resolves(importlib, ref):
                missing.add(f"{file.relative_to(ROOT)}: {ref}")
    assert not missing, sorted(missing)


def _resolves(importlib, dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        obj = module
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_the_error_tree_lives_in_one_file():
    """Every error class a user can see (a subclass of one in templar/errors.py) is defined in templar/errors.py."""
    tree = ast.parse((ROOT / "templar" / "errors.py").read_text())
    errors = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    elsewhere = []
    for module, path in modules().items():
        if module == "templar.errors":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            bases = {getattr(b, "id", getattr(b, "attr", "")) for b in getattr(node, "bases", ())}
            if isinstance(node, ast.ClassDef) and bases & errors:
                elsewhere.append(f"{module}.{node.name}")
    assert not elsewhere, f"error classes outside templar/errors.py: {elsewhere}"
