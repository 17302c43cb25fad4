"""ONNX files as a model repository stores them.

A graph under protobuf's 2 GB limit is one file, `model.onnx`. Past it (a 0.6B-parameter RM is 2.4 GB in float32),
torch.onnx.export writes every weight to a file of its own beside the graph; they are gathered here into ONE file,
`model.onnx.data`, tensor by tensor (never the whole model in memory), and the graph is rewritten to point at it.
ONNX Runtime (on the embedded server, and Triton's onnxruntime_onnx backend in the GPU container) and TensorRT's
parser then load `model.onnx` with its data from the same folder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

DATA_SUFFIX = ".data"
ALIGNMENT = 4096  # tensors start at page boundaries in the data file, so they can be memory-mapped


def _tensors(graph) -> Iterator:
    """Every TensorProto of a graph: initializers and tensor attributes, subgraphs included."""
    from onnx import AttributeProto

    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == AttributeProto.TENSOR:
                yield attribute.t
            elif attribute.type == AttributeProto.TENSORS:
                yield from attribute.tensors
            elif attribute.type == AttributeProto.GRAPH:
                yield from _tensors(attribute.g)
            elif attribute.type == AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _tensors(subgraph)


def _external(tensor) -> dict[str, str] | None:
    from onnx import TensorProto

    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return {entry.key: entry.value for entry in tensor.external_data}


def data_files(path: str | os.PathLike) -> list[Path]:
    """The external data files a graph refers to (none for a self-contained graph)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    names = {info["location"] for tensor in _tensors(model.graph) if (info := _external(tensor))}
    return [path.parent / name for name in sorted(names)]


def model_files(path: str | os.PathLike) -> list[Path]:
    """The graph and its data files: what a repository must hold for the model to load."""
    return [Path(path), *data_files(path)]


def gather_external_data(path: str | os.PathLike, progress: Callable[[int, int], None] = lambda done, total: None
                         ) -> list[Path]:
    """Move the weights a graph keeps in several files beside it into one, `<name>.data`, rewriting the graph's
    references; returns the model's files. A self-contained graph is left as it is."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    tensors = [(tensor, info) for tensor in _tensors(model.graph) if (info := _external(tensor))]
    if not tensors:
        return [path]
    target = path.with_name(path.name + DATA_SUFFIX)
    scratch = target.with_name(target.name + ".partial")
    sources = {path.parent / info["location"] for _, info in tensors}
    total = sum(int(info.get("length") or (path.parent / info["location"]).stat().st_size) for _, info in tensors)
    done = 0
    with open(scratch, "wb") as out:
        for tensor, info in tensors:
            with open(path.parent / info["location"], "rb") as source:
                source.seek(int(info.get("offset") or 0))
                data = source.read(int(info["length"])) if info.get("length") else source.read()
            out.write(b"\0" * (-out.tell() % ALIGNMENT))
            offset = out.tell()
            out.write(data)
            _point_at(tensor, target.name, offset, len(data))
            done += len(data)
            progress(done, total)
    onnx.save(model, str(path))  # the graph alone: the tensors' bytes stay in the data file
    for source in sources:
        source.unlink(missing_ok=True)
    scratch.replace(target)
    return [path, target]


def _point_at(tensor, location: str, offset: int, length: int) -> None:
    """A tensor's external-data reference, rewritten (its bytes are not in memory, only the reference)."""
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 over a model's files (graph and data, names and contents), read in blocks."""
    digest = hashlib.sha256()
    for file in model_files(path):
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()
