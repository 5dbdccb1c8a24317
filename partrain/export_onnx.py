"""`partrain export RUN --onnx FILE`: a run's trained network as one ONNX graph.

The graph takes what a user has, not what the network sees:

    input  "pixels"  float32 (N, 3, H, W), pixel values 0..255 (uint8 images cast to float), RGB
                     channels first; N is dynamic, H and W are the model's (`model.input_shape`)
    output "logits"  float32 (N, n_classes) (`model.n_classes`); softmax them for probabilities

The run's normalisation is inside the graph, the same numbers `partrain evaluate` normalises with
(`api.load_run`: `batches.run_normaliser` of the run's store): x = pixels · scale - shift, where
--normalize channel gives (pixel - mean) / std per channel and --normalize mean-image subtracts
the mean training image (`Sub` alone: its scale is 1). Then the network in evaluation mode
(`onnx_layers`: batch norm with its running statistics, airbench's frozen whitening conv, GELU in
partrain's tanh form, floor-mode max-pools, the head's scale). A user of the file needs neither
partrain nor the data set, and cannot normalise wrong. Test-time augmentation is not in it.

Only standard operators of opset 17 (IR version 8), so runtimes of 2022 on read it; the class
names, the model, its options and the checkpoint go into the model's metadata_props. The file is
checked (`onnx.checker`, with shape inference) before it is written, and written to a temporary
file that then replaces FILE (os.replace): an existing FILE is the old one or the new one, never
half of either. `onnx` is an optional extra (`pip install 'partrain[onnx]'`), imported only here.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import __version__, api
from .errors import PartrainError
from .onnx_layers import Graph, add_layers
from .rundir import write_atomic

OPSET = 17
IR_VERSION = 8  # the IR version that came with opset 17 (onnx 1.12)
INPUT, OUTPUT = "pixels", "logits"
NORMALISATIONS = {"channel": "channel mean/std",
                  "mean-image": "mean-image (the mean training image subtracted)"}


def require_onnx():
    """The onnx module, or the one line that says how to install it."""
    try:
        import onnx
        import onnx.checker
        import onnx.numpy_helper
    except ImportError:
        raise PartrainError("exporting to ONNX needs the onnx package: "
                            "pip install 'partrain[onnx]'") from None
    return onnx


def onnx_model(model, scale, shift, metadata: dict | None = None, doc: str = ""):
    """The checked ModelProto of `model` (bound to its parameters) with the normalisation
    x = pixels · scale - shift in front (`batches.normaliser`'s arrays: (C, 1, 1) or (C, H, W)).
    metadata: {key: text} for metadata_props."""
    onnx = require_onnx()
    helper = onnx.helper
    g = Graph(onnx)
    g.name(INPUT)
    x = INPUT
    scale = np.asarray(scale, np.float32)
    if not np.all(scale == 1):  # x · 1 is x exactly: mean-image needs only its Sub
        x = g.op("Mul", [x, g.const("normalise.scale", scale)], "normalise_scaled")
    x = g.op("Sub", [x, g.const("normalise.shift", shift)], "normalised")
    last = add_layers(g, model, x)
    g.nodes.append(helper.make_node("Identity", [last], [OUTPUT], name=OUTPUT))
    c, h, w = model.input_shape
    graph = helper.make_graph(
        g.nodes, f"partrain_{model.name}".replace("-", "_"),
        [helper.make_tensor_value_info(INPUT, onnx.TensorProto.FLOAT, ["N", c, h, w])],
        [helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT, ["N", model.n_classes])],
        initializer=g.initializers, doc_string=doc)
    proto = helper.make_model(graph, producer_name="partrain", producer_version=__version__,
                              opset_imports=[helper.make_opsetid("", OPSET)], doc_string=doc)
    proto.ir_version = IR_VERSION
    helper.set_model_props(proto, {k: str(v) for k, v in (metadata or {}).items()})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise PartrainError(f"the ONNX graph of model {model.name} does not check: "
                            f"{str(e).splitlines()[0] if str(e) else e}") from None
    return proto


def describe_input(model, normalize: str) -> str:
    """'input float32 (N, 3, 32, 32) pixels 0..255, normalisation ... inside the graph'."""
    c, h, w = model.input_shape
    return (f"input float32 (N, {c}, {h}, {w}) pixels 0..255, normalisation "
            f"{NORMALISATIONS.get(normalize, normalize)} inside the graph")


def check_output(path) -> Path:
    """`path` as a file to write: its folder exists, it is not a folder itself."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise PartrainError(f"cannot write {path}: the folder {folder} "
                            + ("is not a folder" if folder.exists() else "does not exist"))
    if path.is_dir():
        raise PartrainError(f"cannot write {path}: it is a folder (give a file name, such as "
                            f"{path / 'model.onnx'})")
    return path


def export_run(run, out, checkpoint: str = "best", data_dir=None) -> dict:
    """Write the ONNX graph of run folder `run` (its `checkpoint`, normalised with the
    statistics of the run's store, or of `data_dir`'s) to `out`. Returns {"path", "bytes",
    "input" (describe_input's words), "model", "checkpoint", "epoch"}."""
    require_onnx()
    out = check_output(out)
    r = api.load_run(run, checkpoint=checkpoint, data_dir=data_dir)  # as evaluate loads it
    normalize = r.config.normalize
    words = describe_input(r.model, normalize)
    meta = {"partrain.model": r.model.name,
            "partrain.model_options": json.dumps(r.model.options, sort_keys=True),
            "partrain.class_names": json.dumps(list(r.class_names)),
            "partrain.normalize": normalize,
            "partrain.run": str(r.path), "partrain.checkpoint": r.checkpoint["path"],
            "partrain.epoch": r.checkpoint["epoch"], "partrain.input": words}
    doc = (f"partrain {r.model.name} from {r.path} ({Path(r.checkpoint['path']).name}, epoch "
           f"{r.checkpoint['epoch']}): {words}; output logits (N, {r.model.n_classes}) for the "
           f"classes {', '.join(r.class_names)}")
    proto = onnx_model(r.model, r.scale, r.shift, meta, doc)
    data = proto.SerializeToString()
    write_atomic(out, data)
    return {"path": str(out), "bytes": len(data), "input": words, "model": r.model.name,
            "checkpoint": r.checkpoint["path"], "epoch": r.checkpoint["epoch"]}


def human_size(n: int) -> str:
    """1234567 -> '1.2 MiB'."""
    if n < 1024:
        return f"{n} B"
    if n < 1 << 20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1 << 20):.1f} MiB"


def format_result(result: dict) -> str:
    """The one line `partrain export` prints."""
    return f"wrote {result['path']} ({human_size(result['bytes'])}): {result['input']}"
