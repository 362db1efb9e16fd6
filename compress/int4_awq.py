"""INT4 weight-only AWQ-lite of the LLM step graph for TensorRT, one weight in memory at a time.

The TensorRT targets' default recipe quantizes the LLM's MatMul weights to INT4 (W4A16): each
weight `W [K, N]` becomes a blocked opset-21 `DequantizeLinear(W_q int4, scale [ceil(K/B), N],
axis=0, block_size=B)`, which TensorRT 10 builds as a weight-only INT4 GEMM, and the input gets
its AWQ scale as a `Mul` (`x * 1/s` feeding `MatMul(x / s, dq(q(W * s)))`).

Why not ModelOpt's ONNX INT4 (`modelopt_quant.ModelOptInt4Quantizer`, still selectable with
`ModelOptInt4Settings`): measured on the 8B-width slice (1 LLM layer, full vocabulary, a 3.1 GB
fp32 LLM graph) it loads the graph with its weights, deep-copies it, opens an ONNX Runtime
session on the augmented copy and builds the quantized graph in memory: 21.9 GiB peak for 3.1 GB
of weights, then `EncodeError: Failed to serialize proto` (protobuf's 2 GB limit) on the way
out. The full 8B needs its INT4 on a 64 GB machine (a Jetson AGX Orin 64GB builds its own
plans), so this quantizer keeps at most one weight (in column chunks) and the calibration
activations in memory:

1. record: the graph's proto without weights, plus one extra output per distinct MatMul input,
   saved beside the source so that it reads the same external-data file; one ONNX Runtime
   session (optimizations off, names kept) runs the calibration feeds, keeping per input channel
   the mean |x| and at most `max_tokens` rows of x (evenly spread over the samples);
2. search (AWQ-lite, Lin et al. 2024): for each weight and each alpha in 0, step, ..., 1,
   `s = mean|x| ** alpha` normalised by sqrt(max * min); the loss is ||X W - (X / s) dq(q(W s))||²
   on the recorded rows, accumulated over column chunks read from a memory map of the
   external data; alpha 0 is plain round-to-nearest, so AWQ is never worse than RTN on them;
3. write: weights streamed one at a time into the new external-data file (quantized ones
   packed two int4 per byte, low nibble first; the others copied in chunks).

Symmetric INT4 (-8..7, scale = amax / 7 per block of `block_size` rows of one column, the last
block of a K that is not a multiple of it shorter), no zero point: what TensorRT's weight-only
INT4 GEMM and ONNX Runtime's CPU DequantizeLinear both run. The scales have the weight's float
type. ONNX Runtime checks the graph in "reference" mode (`fidelity`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from citrus_edge.external_data import CHUNK_BYTES, NP_DTYPES, ExternalWriter, TensorReader

from .ort_quant import skipped_ends
from .registry import Candidate, QuantRequest, UnsupportedQuantizationError, register_quantizer
from .settings import Int4AwqSettings, ModelOptInt4Settings, settings_to_dict

log = logging.getLogger(__name__)

INT4_OPSET = 21  # blocked DequantizeLinear and the INT4 type
QMIN, QMAX = -8, 7


# -------------------------------------------------------------------------------- the numbers


def quantize_blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric blocked INT4 of `w [K, N]` along K: (q int8 [K, N] in -8..7, scale float32
    [ceil(K/block), N]); an all-zero block gets scale 1."""
    k, n = w.shape
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), np.float32)
    padded[:k] = w
    amax = np.abs(padded.reshape(blocks, block, n)).max(axis=1)
    scale = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
    q = np.rint(padded.reshape(blocks, block, n) / scale[:, None, :])
    q = np.clip(q, QMIN, QMAX).astype(np.int8).reshape(blocks * block, n)[:k]
    return q, scale


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    """The float32 values `DequantizeLinear(q, scale, axis=0, block_size=block)` gives."""
    return q.astype(np.float32) * np.repeat(scale, block, axis=0)[: q.shape[0]]


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX INT4 raw data: elements in row-major order, two per byte, the first in the low
    nibble; an odd count pads the last high nibble with 0."""
    flat = q.reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def awq_scales(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """AWQ's per-input-channel scale for `alpha` (1 everywhere for alpha 0)."""
    s = np.maximum(mean_abs.astype(np.float64), 1e-4) ** alpha
    s = s / np.sqrt(s.max() * s.min())
    return s.astype(np.float32)


def search_alpha(
    x: np.ndarray,
    mean_abs: np.ndarray,
    columns: Iterator[np.ndarray],
    alphas: list[float],
    block: int,
) -> tuple[float, list[float]]:
    """The alpha with the least output error on the rows `x [T, K]`, and each alpha's mean
    squared error; `columns` yields the weight's column chunks `[K, n]` (float32)."""
    scales = [awq_scales(mean_abs, a) for a in alphas]
    sq_err = np.zeros(len(alphas))
    count = 0
    for w in columns:
        ref = x @ w
        for i, s in enumerate(scales):
            q, scale = quantize_blocks(w * s[:, None], block)
            approx = (x / s) @ dequantize_blocks(q, scale, block)
            sq_err[i] += float(np.square(approx - ref, dtype=np.float64).sum())
        count += ref.size
    mse = (sq_err / max(count, 1)).tolist()
    return alphas[int(np.argmin(mse))], mse


def column_chunks(w: np.ndarray, scale: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """float32 column chunks of `w [K, N]` (times the row scale `scale [K]` if given)."""
    k, n = w.shape
    step = max(2, (CHUNK_BYTES // (4 * max(k, 1))) // 2 * 2)
    for c in range(0, n, step):
        chunk = np.asarray(w[:, c : c + step], dtype=np.float32)
        yield chunk if scale is None else chunk * scale[:, None]


# -------------------------------------------------------------------------------- quantizer


@dataclass
class _Stats:
    """Calibration statistics of one MatMul input: per-channel mean |x| and sampled rows."""

    mean_abs: np.ndarray
    rows: np.ndarray


class StreamingInt4Quantizer:
    """INT4 AWQ-lite (or round-to-nearest) of the LLM step graph, weights streamed."""

    ort_mode = "reference"
    qdq_graph = True  # node names kept: sensitivity trials may leave nodes float
    per_channel_weights = False

    def __init__(self, request: QuantRequest, settings: Int4AwqSettings):
        _check(request)
        self.component, self.precision = request.component, request.precision
        self.settings, self.src = settings, Path(request.src)
        self.scheme, self.method = settings.scheme, settings.method
        self.calib = list(request.calib)
        model = onnx.load(str(self.src), load_external_data=False)
        self.input_names = [i.name for i in model.graph.input]
        weights = {
            t.name: t
            for t in model.graph.initializer
            if t.data_type in NP_DTYPES and len(t.dims) == 2
        }
        lm_head = logits_matmuls(model) if settings.keep_lm_head else set()
        quantizable = [
            n
            for n in model.graph.node
            if n.op_type in settings.op_types
            and len(n.input) == 2
            and n.input[1] in weights  # a 2-D float initializer: what `write` streams
            and n.name not in lm_head
        ]
        self._candidates = [Candidate(n.name, n.op_type) for n in quantizable]
        self._activation = {n.name: n.input[0] for n in quantizable}
        self.external = any(
            t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer
        )
        self._alpha: dict[str, float] | None = None
        self._mse: dict[str, list[float]] = {}

    def candidates(self) -> list[Candidate]:
        return list(self._candidates)

    # -- 1. record

    def _record(self) -> dict[str, _Stats]:
        import onnxruntime as ort

        model = onnx.load(str(self.src), load_external_data=False)
        wanted = sorted(set(self._activation.values()))
        elem = {t.name: t.data_type for t in model.graph.initializer}
        node_of = {n.input[0]: n for n in model.graph.node if n.name in self._activation}
        existing = {o.name for o in model.graph.output}
        for name in wanted:
            if name not in existing:
                dtype = elem[node_of[name].input[1]]
                model.graph.output.append(helper.make_tensor_value_info(name, dtype, None))
        probe = self.src.with_name(f"{self.src.stem}.awq-probe.onnx")
        onnx.save(model, str(probe))
        del model
        try:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess = ort.InferenceSession(str(probe), opts, providers=["CPUExecutionProvider"])
            per_sample = max(1, self.settings.max_tokens // max(len(self.calib), 1))
            sums: dict[str, np.ndarray] = {}
            counts: dict[str, int] = dict.fromkeys(wanted, 0)
            rows: dict[str, list[np.ndarray]] = {n: [] for n in wanted}
            for feeds in self.calib:
                inputs = {k: feeds[k] for k in self.input_names}
                for name, value in zip(wanted, sess.run(wanted, inputs), strict=True):
                    x = np.asarray(value, np.float32).reshape(-1, value.shape[-1])
                    sums[name] = sums.get(name, 0) + np.abs(x).sum(axis=0, dtype=np.float64)
                    counts[name] += x.shape[0]
                    pick = np.linspace(0, x.shape[0] - 1, min(per_sample, x.shape[0])).round()
                    rows[name].append(x[pick.astype(int)].copy())
            del sess
        finally:
            probe.unlink(missing_ok=True)
        return {
            n: _Stats((sums[n] / counts[n]).astype(np.float32), np.concatenate(rows[n]))
            for n in wanted
        }

    # -- 2. search

    def _search(self) -> dict[str, float]:
        if self._alpha is not None:
            return self._alpha
        s = self.settings
        if s.method == "rtn":
            self._alpha = {c.name: 0.0 for c in self._candidates}
            return self._alpha
        stats = self._record()
        model = onnx.load(str(self.src), load_external_data=False)
        inits = {t.name: t for t in model.graph.initializer}
        nodes = {n.name: n for n in model.graph.node}
        reader = TensorReader(self.src)
        steps = round(1 / s.alpha_step)
        alphas = [round(i * s.alpha_step, 6) for i in range(steps + 1)]
        self._alpha = {}
        for c in self._candidates:
            node = nodes[c.name]
            st = stats[node.input[0]]
            w = reader.array(inits[node.input[1]])
            best, mse = search_alpha(st.rows, st.mean_abs, column_chunks(w), alphas, s.block_size)
            self._alpha[c.name], self._mse[c.name] = best, mse
            log.debug("%s: AWQ alpha %.2f (mse %.3g, rtn %.3g)", c.name, best, min(mse), mse[0])
            del w
        self._stats = stats
        return self._alpha

    # -- 3. write

    def write(self, dst: Path, exclude: frozenset[str]) -> None:
        alpha = self._search()
        s = self.settings
        fixed = set(s.nodes_to_exclude) | skipped_ends(self._candidates, s.skip_first, s.skip_last)
        chosen = [c.name for c in self._candidates if c.name not in fixed | set(exclude)]
        model = onnx.load(str(self.src), load_external_data=False)
        _ensure_opset(model)
        reader = TensorReader(self.src)
        inits = {t.name: t for t in model.graph.initializer}
        users: dict[str, int] = {}
        for n in model.graph.node:
            for i in n.input:
                users[i] = users.get(i, 0) + 1
        dst = Path(dst)
        writer = ExternalWriter(Path(f"{dst}.data")) if self.external else None
        new_inits: list[TensorProto] = []
        before: dict[str, list[onnx.NodeProto]] = {}
        quantized_weights: set[str] = set()
        try:
            by_name = {n.name: n for n in model.graph.node}
            for name in chosen:
                node = by_name[name]
                w_name = node.input[1]
                w_init = inits[w_name]
                w = reader.array(w_init)
                k, n_cols = w.shape
                s_vec = (
                    awq_scales(self._stats[node.input[0]].mean_abs, alpha[name])
                    if (alpha[name] > 0)
                    else np.ones(k, np.float32)
                )
                q, scale = _quantize_streamed(w, s_vec, s.block_size)
                del w
                float_type = w_init.data_type
                q_t = TensorProto(
                    name=f"{name}.weight_int4", data_type=TensorProto.INT4, dims=[k, n_cols]
                )
                scale_t = numpy_helper.from_array(
                    scale.astype(NP_DTYPES[float_type]), f"{name}.weight_scale"
                )
                _put(q_t, pack_int4(q), writer)
                del q
                _put_small(scale_t, writer)
                new_inits += [q_t, scale_t]
                dq_out = f"{name}.weight_dq"
                extra = [
                    helper.make_node(
                        "DequantizeLinear",
                        [q_t.name, scale_t.name],
                        [dq_out],
                        name=f"{name}.dq",
                        axis=0,
                        block_size=s.block_size,
                    )
                ]
                if alpha[name] > 0:
                    inv = numpy_helper.from_array(
                        (1.0 / s_vec).astype(NP_DTYPES[float_type]), f"{name}.awq_inv_scale"
                    )
                    _put_small(inv, writer)
                    new_inits.append(inv)
                    scaled = f"{name}.awq_input"
                    extra.insert(
                        0,
                        helper.make_node(
                            "Mul", [node.input[0], inv.name], [scaled], name=f"{name}.awq"
                        ),
                    )
                    node.input[0] = scaled
                node.input[1] = dq_out
                users[w_name] -= 1
                quantized_weights.add(w_name)
                before[name] = extra
            kept = [
                t
                for t in model.graph.initializer
                if not (t.name in quantized_weights and users[t.name] == 0)
            ]
            for t in kept:
                if writer is not None and t.data_location == TensorProto.EXTERNAL:
                    copy = TensorProto()
                    copy.CopyFrom(t)
                    writer.put(t, reader.raw_chunks(copy))
            del model.graph.initializer[:]
            model.graph.initializer.extend(kept + new_inits)
            nodes = []
            for n in model.graph.node:
                nodes += before.get(n.name, [])
                nodes.append(n)
            del model.graph.node[:]
            model.graph.node.extend(nodes)
        finally:
            if writer is not None:
                writer.close()
        onnx.save(model, str(dst))
        log.info(
            "%s: INT4 %d of %d MatMuls -> %s",
            self.component,
            len(chosen),
            len(self._candidates),
            dst,
        )

    def describe(self) -> dict:
        alphas = self._alpha or {}
        return {
            "scheme": self.scheme,
            "settings": settings_to_dict(self.settings),
            "calibration": {
                "method": self.method,
                "samples": len(self.calib),
                "rows_per_input": self.settings.max_tokens,
                "alpha": {k: alphas[k] for k in sorted(alphas)},
            },
            "validated_by": "ort-reference",
        }


# Ops between the vocabulary projection's MatMuls and the `logits` output (slices, casts).
PASS_THROUGH = {
    "Concat",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Transpose",
    "Cast",
    "Identity",
}


def logits_matmuls(model: onnx.ModelProto, output: str = "logits") -> set[str]:
    """Names of the MatMuls whose results reach the graph output `output` through
    PASS_THROUGH ops only: the LM head (one MatMul, or one per vocabulary slice)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    found, todo, seen = set(), [output], set()
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "MatMul":
            found.add(node.name)
        elif node.op_type in PASS_THROUGH:
            todo += list(node.input)
    return found


def _quantize_streamed(
    w: np.ndarray, s_vec: np.ndarray, block: int
) -> tuple[np.ndarray, np.ndarray]:
    """`quantize_blocks(w * s_vec[:, None])`, read and quantized one column chunk at a time."""
    k, n = w.shape
    q = np.empty((k, n), np.int8)
    scale = np.empty((-(-k // block), n), np.float32)
    c = 0
    for chunk in column_chunks(w, s_vec):
        q[:, c : c + chunk.shape[1]], scale[:, c : c + chunk.shape[1]] = quantize_blocks(
            chunk, block
        )
        c += chunk.shape[1]
    return q, scale


def _put(tensor: TensorProto, raw: bytes, writer: ExternalWriter | None) -> None:
    if writer is None:
        tensor.raw_data = raw
    else:
        writer.put(tensor, [raw])


def _put_small(tensor: TensorProto, writer: ExternalWriter | None) -> None:
    """Move a float tensor made here to the external data (when there is one) past 1 KiB."""
    if writer is not None and len(tensor.raw_data) > 1024:
        writer.put(tensor, [tensor.raw_data])


def _ensure_opset(model: onnx.ModelProto) -> None:
    """Raise the default-domain opset to 21 (blocked DequantizeLinear, INT4).

    From 20 the label is raised in place: opset 21 only widens the types of the ops it
    re-versions (Cast, Reshape, Transpose, Q/DQ ...), except GroupNormalization, which an LLM
    step graph does not hold. Below 20, ONNX's version converter (on the proto without its
    weights: external tensors keep pointing at their data)."""
    entry = next(o for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if entry.version >= INT4_OPSET:
        return
    if entry.version >= 20:
        if any(n.op_type == "GroupNormalization" for n in model.graph.node):
            raise UnsupportedQuantizationError(
                "llm: GroupNormalization changes meaning at opset 21"
            )
        entry.version = INT4_OPSET
        return
    converted = onnx.version_converter.convert_version(model, INT4_OPSET)
    model.CopyFrom(converted)


def _check(request: QuantRequest) -> None:
    if request.component != "llm":
        raise UnsupportedQuantizationError(
            f"{request.component}: int4 is the LLM's weight-only format (recipes.Precision)"
        )
    if not isinstance(request.settings, Int4AwqSettings | ModelOptInt4Settings):
        raise UnsupportedQuantizationError(
            f"llm: TensorRT int4 takes Int4AwqSettings or ModelOptInt4Settings, got "
            f"{type(request.settings).__name__}"
        )


def _factory(request: QuantRequest):
    if isinstance(request.settings, ModelOptInt4Settings):
        from .modelopt_quant import ModelOptInt4Quantizer

        return ModelOptInt4Quantizer(request, request.settings)
    return StreamingInt4Quantizer(request, request.settings)


register_quantizer("tensorrt", "int4", check=_check)(_factory)
