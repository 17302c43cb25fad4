"""`<rm>_model` on the embedded CPU server: the RM's own Hugging Face modules in torch, on rows packed into one
sequence with every shared prefix computed once (templar.serving.prefix_packing), no padding, and the last layer
computed only where a score is read.

Why this and not the ONNX graph (docs/benchmarks.md has the measurements): on a CPU the matrix products run near the
machine's peak whatever the runtime, so what is left to win is work not done. Three kinds are skipped here:
- padding: rows of a micro-batch are laid end to end (one [1, T] sequence) instead of padded to the longest;
- shared prefixes: the template's preamble every conversation starts with, and the prompt a GRPO group's n responses
  share, are computed once per micro-batch; each token attends exactly to its own row's tokens before it;
- the last layer's queries, attention output, output projection and MLP at positions no score is read from (its keys
  and values are still computed everywhere: the read positions attend to them).

The modules are the model's own (loaded as the export loads them, templar.export.scorer); only the attention function
is this file's (registered with transformers' AttentionInterface), computing each row's causal attention with torch's
scaled_dot_product_attention (sliding windows and logit soft-capping as the model's config asks). A score equals the
row scored alone within float32 rounding (measured max 2e-6 relative; the tests hold 1e-5): the matrix products of a
micro-batch of other rows round differently, which is also why this path states a bound instead of the bit-identity
ONNX Runtime's path keeps (`cpu_runtime onnxruntime`).
"""

from __future__ import annotations

import contextvars
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from templar import contract
from templar.errors import PackedScorerUnsupported
from templar.serving.cpu_precision import BF16_TOLERANCE, INT8_TOLERANCE
from templar.serving.int8_linear import INT8_MAX, quantize_linears, weight_max
from templar.serving.prefix_packing import PackedLayout, pack_rows

MODEL_FOLDER = contract.MODEL_FOLDER  # the RM's folder inside the version folder (config.json, weights, its code)
ATTENTION = "templar_packed"  # the name this module's attention function is registered under
# "1": this machine's packed scorers run their layers uncompiled, whatever the export said (the test suite: every
# server start would trace them again)
NO_COMPILE_ENV = "TEMPLAR_NO_COMPILE"
_LAYOUT: contextvars.ContextVar[PackedLayout] = contextvars.ContextVar("templar_packed_layout")


# -- attention ---------------------------------------------------------------------------------------------------
def _allowed(queries: int, keys: int, offset: int, window: int | None) -> torch.Tensor:
    """[queries, keys] bool: query j (at key index offset + j) sees keys <= offset + j, and with a sliding window
    only the last `window` of them (transformers' rule: key > query - window)."""
    q = torch.arange(offset, offset + queries).unsqueeze(1)
    k = torch.arange(keys).unsqueeze(0)
    allowed = k <= q
    return allowed & (k > q - window) if window else allowed


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
            scaling: float | None, softcap: float | None) -> torch.Tensor:
    """[1, H, Lq, D] queries over [1, KV, Lk, D] keys/values (grouped-query heads) -> [1, H, Lq, D]."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                              scale=scaling, enable_gqa=True)
    groups = q.shape[1] // k.shape[1]  # soft-capped logits (Gemma-2): written out, as the model's eager code does
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    logits = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * (scaling or q.shape[-1] ** -0.5) / softcap) * softcap
    if mask is None:
        mask = _allowed(q.shape[2], k.shape[2], k.shape[2] - q.shape[2], None)
    logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return torch.matmul(torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _gather(t: torch.Tensor, spans) -> torch.Tensor:
    parts = [t[:, :, start:end] for start, end in spans]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                     softcap=None, **kwargs):
    """transformers' attention interface over the current PackedLayout: query/key/value [1, H, T, D]; returns
    [1, T, H, D] (and no attention weights)."""
    layout = _LAYOUT.get()
    out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    if getattr(module, "templar_reads_only", False):  # the last layer: only where scores are read
        for read, spans in zip(layout.reads.tolist(), layout.read_contexts):
            k, v = _gather(key, spans), _gather(value, spans)
            if sliding_window:
                k, v = k[:, :, -sliding_window:], v[:, :, -sliding_window:]
            out[:, read] = _attend(query[:, :, read:read + 1], k, v, None, False, scaling, softcap)[:, :, 0]
        return out, None
    for node in layout.nodes:
        spans = (*node.context, (node.start, node.end))
        k, v = _gather(key, spans), _gather(value, spans)
        offset = k.shape[2] - (node.end - node.start)
        mask = None if offset == 0 and not sliding_window else \
            _allowed(node.end - node.start, k.shape[2], offset, sliding_window)
        attended = _attend(query[:, :, node.start:node.end], k, v, mask, True, scaling, softcap)
        out[:, node.start:node.end] = attended.transpose(1, 2)
    return out, None


def _register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    # the compiled layers (compile_layers) call it as it is: its Python loop over the layout is not traced
    AttentionInterface.register(ATTENTION, torch.compiler.disable(packed_attention))
    AttentionMaskInterface.register(ATTENTION, lambda *args, **kwargs: None)  # the layout is the mask


class _ReadRowsOnly(torch.nn.Module):
    """Wraps a module of the last layer that works token by token (a projection, the MLP): computed only at the
    positions a score is read from; zeros elsewhere, which nothing reads."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        reads = torch.from_numpy(_LAYOUT.get().reads)
        picked = self.inner(hidden[:, reads])
        out = picked.new_zeros(*hidden.shape[:-1], picked.shape[-1])
        out[:, reads] = picked
        return out


def _utf8_files() -> None:
    """Files open as UTF-8 by default: Triton's stub embeds Python without UTF-8 mode, so under a C/POSIX locale
    they open as ASCII, and torch.compile reads kernel templates that are UTF-8."""
    import locale

    if locale.getpreferredencoding(False).lower().replace("-", "") != "utf8":
        try:
            locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
        except locale.Error:
            pass  # no such locale here: compiling may fail, and then the layers run uncompiled


def _decoder_layers(backbone: torch.nn.Module) -> torch.nn.ModuleList:
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise PackedScorerUnsupported(f"{type(backbone).__name__} has no `layers` list of decoder layers")
    return layers


def skip_unread_positions_in_the_last_layer(backbone: torch.nn.Module) -> list[str]:
    """Wrap the last decoder layer's token-wise parts (query and output projections, MLP) to run at read positions
    only, and mark its attention to attend from them only. Returns what was wrapped."""
    last = _decoder_layers(backbone)[-1]
    attention = getattr(last, "self_attn", None)
    if attention is None:
        raise PackedScorerUnsupported(f"{type(last).__name__} has no `self_attn`")
    attention.templar_reads_only = True
    wrapped = []
    for owner, name in ((attention, "q_proj"), (attention, "o_proj"), (last, "mlp")):
        inner = getattr(owner, name, None)
        if isinstance(inner, torch.nn.Module):
            setattr(owner, name, _ReadRowsOnly(inner))
            wrapped.append(name)
    if "o_proj" not in wrapped:  # the attention output must only be read where it was computed
        raise PackedScorerUnsupported(f"{type(attention).__name__} has no `o_proj`")
    return wrapped


# how far the compiled layers' scores may be from the uncompiled ones' on the warm-up batch, relative (max(1, |s|)):
# fused kernels round differently (in int8, a fused division lands a few activations on the other side of a rounding
# step: measured 1.6e-2 on the benchmark RM), a wrong kernel is off by far more (NaN, or whole units); each
# precision's own export tolerance
COMPILED_AGREEMENT = {"fp32": 1e-4, "bf16": BF16_TOLERANCE, "int8": INT8_TOLERANCE}


def _largest_error(got, expected) -> float:
    from templar.export.scorer import parity_error

    pairs = zip(got, expected) if isinstance(got, tuple) else [(got, expected)]  # a multi-objective RM: both outputs
    return max(float(parity_error(a, b).max()) for a, b in pairs)


# -- the scorer --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadOptions:
    """How the export loaded the folder (recorded in the scoring model's config, contract.PARAM_PACKED_LOAD)."""

    value_head_prefix: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    objective_weights: dict[str, float] | list[float] | None = None  # as `templar export --objective-weights`

    def to_json(self) -> str:
        return json.dumps({"value_head_prefix": self.value_head_prefix, "trust_remote_code": self.trust_remote_code,
                           "allow_pickle": self.allow_pickle, "objective_weights": self.objective_weights})

    @classmethod
    def from_json(cls, text: str) -> LoadOptions:
        return cls(**json.loads(text)) if text else cls()


def read_positions(rows: list[np.ndarray], pad_id: int | None) -> list[int]:
    """Where each unpadded row's score is read: its last token that is not `pad_id` (the last token with no pad id;
    a row of nothing but pad tokens: position 0), the rule the ONNX graph and the model's own forward follow."""
    if pad_id is None:
        return [len(row) - 1 for row in rows]
    kept = [np.flatnonzero(row != pad_id) for row in rows]
    return [int(k[-1]) if len(k) else 0 for k in kept]


class PackedScorer:
    """An exported RM folder scored on packed rows: (ids [B, L], mask [B, L]) right-padded -> [B, 1] float32 scores
    (a multi-objective RM: ([B, 1], [B, K]))."""

    def __init__(self, folder: str | Path, *, pad_id: int | None, precision: str = "fp32", threads: int = 0,
                 load: LoadOptions = LoadOptions(), share_prefixes: bool = True, compile: bool = False,
                 log=lambda message: None) -> None:
        from templar.export.scorer import load_reward_model

        if threads:
            torch.set_num_threads(threads)
        _register_attention()
        loaded = load_reward_model(folder, allow_pickle=load.allow_pickle, value_head_prefix=load.value_head_prefix,
                                   trust_remote_code=load.trust_remote_code, objective_weights=load.objective_weights)
        if loaded.scorer is None:
            raise PackedScorerUnsupported("an RM whose own code combines its objectives is served by its own forward")
        self.scorer = loaded.scorer.eval()
        self.scorer.pad_id = pad_id
        self.share_prefixes = share_prefixes
        self.precision = precision
        backbone = self.scorer.backbone
        setter = getattr(backbone, "set_attn_implementation", None)
        if setter is None or not backbone._can_set_attn_implementation():  # noqa: SLF001 - transformers' own check
            raise PackedScorerUnsupported(f"{type(backbone).__name__} does not run its attention through transformers' "
                                   "AttentionInterface")
        setter(ATTENTION)
        self.wrapped = skip_unread_positions_in_the_last_layer(backbone)
        if precision == "bf16":
            backbone.to(torch.bfloat16)  # the head stays float32: the read hidden states are cast to it
        elif precision == "int8":  # the decoder layers' products; embeddings, norms and the head stay float32
            levels = weight_max()
            count = sum(quantize_linears(layer, levels) for layer in _decoder_layers(backbone))
            log(f"int8 products in {count} linear layers, weights to +-{levels}" + (
                "" if levels == INT8_MAX else " (7 bits: this machine's int8 products saturate with full-range "
                "operands, no VNNI/AMX)"))
        elif precision != "fp32":
            raise ValueError(f"the packed scorer computes in fp32, bf16 or int8, not {precision!r}")
        if compile and os.environ.get(NO_COMPILE_ENV, "") == "1":
            log(f"${NO_COMPILE_ENV}=1: the layers run uncompiled on this machine")
            compile = False
        self.compiled = compile and self._compile(log)

    def _compile(self, log) -> bool:
        """torch.compile every decoder layer but the last (its read-position parts gather by the layout), then one
        warm-up call compiles them (a few seconds per model shape, cached on disk by torch): fused element-wise work
        (norms, rotary embeddings, activations) measured +30% throughput here. The warm-up's scores are checked
        against the uncompiled layers' (COMPILED_AGREEMENT): torch's on-disk cache of compiled kernels is not keyed
        by everything that shapes them (one written with ATEN_CPU_CAPABILITY=avx512 scored NaN when read back under
        avx2), and the export's check ran elsewhere. Where compiling fails (no C++ compiler) or disagrees, the layers
        run as they are and the log says why."""
        layers = _decoder_layers(self.scorer.backbone)
        eager = list(layers)
        started = time.perf_counter()
        _utf8_files()
        vocab = self.scorer.backbone.get_input_embeddings().num_embeddings
        ids = (np.arange(48, dtype=np.int64).reshape(2, 24) * 7919 + 11) % vocab  # varied tokens, two rows
        mask = np.ones_like(ids)
        expected = self(ids, mask)
        try:
            for i in range(len(layers) - 1):
                layers[i] = torch.compile(eager[i], dynamic=True)
            got = self(ids, mask)
            bound = COMPILED_AGREEMENT[self.precision]
            error = _largest_error(got, expected)
            if not error <= bound:
                raise PackedScorerUnsupported(f"the compiled layers score {error:.3g} (relative) away from the "
                                              f"uncompiled ones on a warm-up batch, past {bound}")
        except Exception as exc:  # noqa: BLE001 - inductor's errors are many kinds; eager is always there
            for i, layer in enumerate(eager):
                layers[i] = layer
            why = str(exc) if isinstance(exc, PackedScorerUnsupported) else \
                f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            log(f"{why}; the layers run uncompiled")
            return False
        log(f"decoder layers compiled (torch.compile) in {time.perf_counter() - started:.1f}s, checked against the "
            f"uncompiled ones on a warm-up batch (max relative difference {error:.1e})")
        return True

    def layout(self, ids: np.ndarray, mask: np.ndarray) -> PackedLayout:
        lengths = np.asarray(mask).sum(axis=1)
        rows = [np.asarray(ids[i, :n], dtype=np.int64) for i, n in enumerate(lengths)]
        return pack_rows(rows, read_positions(rows, self.scorer.pad_id), share=self.share_prefixes)

    @torch.inference_mode()
    def __call__(self, ids: np.ndarray, mask: np.ndarray):
        layout = self.layout(ids, mask)
        token = _LAYOUT.set(layout)
        try:
            hidden = self.scorer.backbone(input_ids=torch.from_numpy(layout.tokens).unsqueeze(0),
                                          position_ids=torch.from_numpy(layout.positions).unsqueeze(0),
                                          use_cache=False).last_hidden_state[0]
        finally:
            _LAYOUT.reset(token)
        result = self.scorer.read(hidden[torch.from_numpy(layout.reads)])
        if isinstance(result, tuple):
            return tuple(r.float().numpy() for r in result)
        return result.float().numpy()


def hidden_size(folder: str | Path) -> int:
    config = json.loads((Path(folder) / "config.json").read_text())
    text = config.get("text_config") or config
    return int(text.get("hidden_size") or 1024)


def create_packed_scorer(version_dir: str | Path, params: Mapping[str, str], settings, *,
                         log=lambda message: None) -> PackedScorer:
    """The scorer of an exported version folder, in the precision `settings.cpu_precision` resolves to here."""
    from templar.serving.cpu_precision import bf16_speedup, resolve

    folder = Path(version_dir) / MODEL_FOLDER
    pad = params.get(contract.PARAM_SCORE_PAD_ID, "")
    if settings.intra_op_threads:
        torch.set_num_threads(settings.intra_op_threads)
    choice = resolve(settings.cpu_precision, runtime="torch", measure=lambda: bf16_speedup(hidden_size(folder)))
    log(choice.reason)
    load = LoadOptions.from_json(params.get(contract.PARAM_PACKED_LOAD, ""))
    return PackedScorer(folder, pad_id=int(pad) if pad else None, precision=choice.precision,
                        threads=settings.intra_op_threads, load=load, share_prefixes=settings.prefix_sharing,
                        compile=settings.packed_compile, log=log)


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        from templar.serving.settings import EntrySettings
        from templar.serving.triton_utils import model_parameters, output_dtypes, scoring_responses

        self.responses = scoring_responses
        params = model_parameters(args)
        settings = EntrySettings.from_parameters(params, "scorer")
        self.dtypes = output_dtypes(args)  # SCORE; a multi-objective RM's SCORE and SCORES
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.scorer = create_packed_scorer(version_dir, params, settings,
                                           log=lambda m: pb_utils.Logger.log_info(f"{args['model_name']}: {m}"))
        # OpenMP's default wait policy is kept on purpose: its threads spin briefly after each parallel region, then
        # sleep (no CPU between batches), where OMP_WAIT_POLICY=PASSIVE (sleep at once) measured 16% slower here:
        # a forward is thousands of small parallel regions
        how = "compiled" if self.scorer.compiled else "uncompiled"
        pb_utils.Logger.log_info(f"{args['model_name']}: scoring in {self.scorer.precision} on torch "
                                 f"({torch.get_num_threads()} threads, {how} layers), packed rows "
                                 f"(shared prefixes {'once' if settings.prefix_sharing else 'per row'}, last layer "
                                 f"at read positions: {', '.join(self.scorer.wrapped)})")

    def execute(self, requests):
        return self.responses(requests, self.scorer, self.dtypes, "torch")
