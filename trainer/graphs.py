"""Proving an exported graph: ONNX ceilings the Pi's runtime reads, parity with the native
model, and the Gather every graph starts with so that it reads the full-width window (a
tree ensemble gets the same gather folded into its feature ids instead)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from schema.artifacts import MODEL_INPUT_NAME, Parity
from schema.extract import gather_indices, input_shape
from trainer.errors import ExportError

# Ceilings of onnxruntime 1.17, the oldest release in ONNXRUNTIME_RANGE (ONNX 1.15):
# a graph above them loads on the workstation and fails on the Pi.
MAX_OPSET = {"": 20, "ai.onnx": 20, "ai.onnx.ml": 4}
MAX_IR_VERSION = 9
PARITY_MAX_ABS_DIFF = 1e-4
PARITY_MIN_AGREEMENT = 0.999
TIE = 1e-6  # native probabilities this close are a tie, whichever class argmax picks
_GATHER_OPSET = 13  # Gather as used here is the same op since opset 1; 13 is what torch exports use


def check_graph(proto: Any, where: str) -> dict[str, int]:
    """Standard domains only, opsets and IR the oldest supported onnxruntime runs. -> opsets."""
    from onnx import helper

    opsets = {o.domain: o.version for o in proto.opset_import}
    for domain, version in opsets.items():
        if domain not in MAX_OPSET:
            raise ExportError(
                f"{where}: uses opset domain {domain!r}; only standard ONNX domains "
                f"({', '.join(repr(d) for d in MAX_OPSET)}) run everywhere"
            )
        if version > MAX_OPSET[domain]:
            raise ExportError(
                f"{where}: opset {domain or 'ai.onnx'} {version} is above {MAX_OPSET[domain]}, "
                f"the highest onnxruntime 1.17 (the Pi's oldest supported) runs"
            )
    for node in proto.graph.node:
        if node.domain not in MAX_OPSET:
            raise ExportError(
                f"{where}: node {node.name or node.op_type} uses non-standard domain {node.domain!r}"
            )
    needed = helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    if needed > MAX_IR_VERSION:
        raise ExportError(
            f"{where}: its opsets need IR version {needed}, onnxruntime 1.17 reads up to {MAX_IR_VERSION}"
        )
    # Newer onnx stamps its own IR version; the graph itself needs only `needed`.
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    return {d or "ai.onnx": v for d, v in opsets.items()}


def _rename_uses(graph: Any, old: str, new: str) -> None:
    """Every node input named ``old`` (in subgraphs too, which may read outer names) -> ``new``."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        for attr in node.attribute:
            if attr.HasField("g"):
                _rename_uses(attr.g, old, new)
            for sub in attr.graphs:
                _rename_uses(sub, old, new)


def gather_channels(proto: Any, channels: Sequence[int], kind: str, where: str) -> Any:
    """Make ``proto`` read the full-width window: a new input of ``input_shape(kind)`` whose
    first node gathers ``channels`` (``schema.extract.gather_indices``) into what the graph
    read before. The graph's maths is untouched, so parity with the native model holds."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inputs = [i for i in graph.input if i.name == MODEL_INPUT_NAME]
    if len(inputs) != 1:
        raise ExportError(
            f"{where}: expected one input named {MODEL_INPUT_NAME!r}, got {[i.name for i in graph.input]}"
        )
    old = inputs[0]
    view = f"{MODEL_INPUT_NAME}_view"
    columns = f"{MODEL_INPUT_NAME}_columns"
    _rename_uses(graph, MODEL_INPUT_NAME, view)
    dims = old.type.tensor_type.shape.dim
    batch = (dims[0].dim_param or dims[0].dim_value) if len(dims) else "batch"
    # The view keeps its old type as value_info, so shape inference still sees its width.
    inner = helper.make_tensor_value_info(view, old.type.tensor_type.elem_type, None)
    inner.type.CopyFrom(old.type)
    graph.value_info.append(inner)
    full = helper.make_tensor_value_info(
        MODEL_INPUT_NAME, TensorProto.FLOAT, [batch or "batch", *input_shape(kind)]
    )
    pos = list(graph.input).index(old)
    graph.input.remove(old)
    graph.input.insert(pos, full)
    graph.initializer.append(numpy_helper.from_array(gather_indices(channels, kind), columns))
    graph.node.insert(
        0, helper.make_node("Gather", [MODEL_INPUT_NAME, columns], [view], axis=1, name="gather_channels")
    )
    if not any(o.domain in ("", "ai.onnx") for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("", _GATHER_OPSET))
    _fold_into_trees(graph, view)
    return proto


def _fold_into_trees(graph: Any, view: str) -> None:
    """A tree ensemble reads features by index: when only tree ensembles read the gathered
    view, their feature ids are renumbered onto the full-width columns and the Gather goes.

    Same numbers (export proves parity), none of the Gather's per-call cost, which at batch
    1 is as large as a small ensemble's own tree walks (measured: docs/DECISIONS.md)."""
    gather = graph.node[0]
    readers = [n for n in graph.node if view in n.input]
    if not readers or any(not n.op_type.startswith("TreeEnsemble") for n in readers):
        return
    from onnx import numpy_helper

    columns = next(t for t in graph.initializer if t.name == gather.input[1])
    cols = numpy_helper.to_array(columns)
    for node in readers:
        for attr in node.attribute:
            if attr.name == "nodes_featureids":
                attr.ints[:] = [int(cols[i]) for i in attr.ints]
        node.input[:] = [gather.input[0] if name == view else name for name in node.input]
    graph.node.remove(gather)
    graph.initializer.remove(columns)
    for vi in [v for v in graph.value_info if v.name == view]:
        graph.value_info.remove(vi)


def measure_parity(native: np.ndarray, onnx_probs: np.ndarray) -> Parity:
    """Max abs probability difference and argmax agreement of two (N, classes) outputs.

    An undertrained tree ensemble can give two classes exactly the same probability;
    its argmax is then decided by float noise on either side, so a window where the
    native probabilities of both argmaxes lie within TIE of each other counts as agreeing
    (the plain figure is kept as argmax_agreement_raw).
    """
    native = np.asarray(native, np.float64)
    onnx_probs = np.asarray(onnx_probs, np.float64)
    if native.shape != onnx_probs.shape:
        raise ExportError(f"parity: native output {native.shape} vs ONNX output {onnx_probs.shape}")
    if not len(native):
        return Parity(windows=0, max_abs_diff=0.0, argmax_agreement=1.0)
    rows = np.arange(len(native))
    a, b = native.argmax(1), onnx_probs.argmax(1)
    same = a == b
    tie = ~same & (np.abs(native[rows, a] - native[rows, b]) <= TIE)
    return Parity(
        windows=len(native),
        max_abs_diff=float(np.abs(native - onnx_probs).max()),
        argmax_agreement=float((same | tie).mean()),
        argmax_agreement_raw=float(same.mean()),
        ties=int(tie.sum()),
    )
