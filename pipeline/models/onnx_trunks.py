"""The NumPy networks' convolutional trunks run by ONNX Runtime: the ``onnx`` model runtime.

The convolutions are nearly all of a forward pass, and ONNX Runtime's CPU kernels run them about 2.5 times
faster than im2col with NumPy's BLAS on the same two cores (docs/MODELS.md, "Inference speed"). This module
writes each NumPy network's trunk (its folded convolutions, ReLUs, residual sums and the detector's
top-down pyramid) as an ONNX graph, in memory, from the very arrays the NumPy network holds: the verified
``weights.safetensors`` stays the one source of the weights, and no file is added to a bundle. Everything else
(the high-pass input, the heads, Grad-CAM in closed form) stays in :mod:`pipeline.models.numpy_nets`, so the
two runtimes differ only in how the trunk's arithmetic is ordered (tests hold them to 1e-4).

ONNX Runtime is imported only when a bundle is loaded into this runtime, and ``onnx`` (the graph builder) only
while the graph is written.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.models.numpy_nets import (
    Conv,
    NumpyFractureNet,
    NumpyTypeReader,
    NumpyValidityNet,
    ResBlock,
    Trunk,
)

OPSET = 17


class _Graph:
    """An ONNX graph being written: one float32 input ``x`` (N, C, H, W) with free N, H and W."""

    def __init__(self, channels: int) -> None:
        from onnx import TensorProto, helper

        self.helper, self.float = helper, TensorProto.FLOAT
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0
        self.input = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", channels, "h", "w"])

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self._name("c")
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        out = self._name(op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def conv(self, x: str, conv: Conv) -> str:
        cout = conv.weight.shape[0]
        weight = conv.weight.reshape(cout, -1, conv.k, conv.k)  # the im2col rows are (cin, ki, kj)
        return self.op("Conv", x, self.const(weight), self.const(conv.bias), kernel_shape=[conv.k, conv.k],
                       strides=[conv.stride, conv.stride], pads=[conv.pad] * 4)

    def relu(self, x: str) -> str:
        return self.op("Relu", x)

    def add(self, a: str, b: str) -> str:
        return self.op("Add", a, b)

    def block(self, x: str, block: ResBlock) -> str:
        y = self.conv(self.relu(self.conv(x, block.conv1)), block.conv2)
        return self.relu(self.add(y, self.conv(x, block.skip) if block.skip is not None else x))

    def blocks(self, x: str, blocks: list[ResBlock]) -> str:
        for block in blocks:
            x = self.block(x, block)
        return x

    def upsample_like(self, x: str, like: str) -> str:
        """``x`` resized (nearest) to the height and width of ``like``, exactly as
        :func:`pipeline.models.numpy_nets.upsample_nearest`: output row ``i`` reads row ``(i * h) // H``, in
        integers."""
        shape_x, shape_like = self.op("Shape", x), self.op("Shape", like)
        zero, one = self.const(np.array(0, np.int64)), self.const(np.array(1, np.int64))
        for axis in (2, 3):
            index = self.const(np.array(axis, np.int64))
            small = self.op("Gather", shape_x, index, axis=0)
            large = self.op("Gather", shape_like, index, axis=0)
            rows = self.op("Div", self.op("Mul", self.op("Range", zero, large, one), small), large)
            x = self.op("Gather", x, rows, axis=axis)
        return x

    def model(self, outputs: list[str]) -> bytes:
        helper = self.helper
        graph = helper.make_graph(
            self.nodes, "trunk", [self.input],
            [helper.make_tensor_value_info(name, self.float, None) for name in outputs],
            initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="fracture-node")
        model.ir_version = 8  # ONNX Runtime reads IR 8 with opset 17 on every release this project allows
        return bytes(model.SerializeToString())


def _stem_to_stage2(g: _Graph, net: NumpyFractureNet | NumpyTypeReader) -> str:
    return g.blocks(g.blocks(g.relu(g.conv("x", net.stem)), net.stage1), net.stage2)


def detector_graph(net: NumpyFractureNet) -> bytes:
    """High-pass input (2 channels) -> the fused pyramid features at 1/8 (:meth:`NumpyFractureNet.backbone`)."""
    g = _Graph(2)
    f2 = _stem_to_stage2(g, net)
    f3 = g.blocks(f2, net.stage3)
    f4 = g.blocks(f3, net.stage4)
    p = g.add(g.upsample_like(g.conv(f4, net.lat4), f3), g.conv(f3, net.lat3))
    p = g.add(g.upsample_like(p, f2), g.conv(f2, net.lat2))
    return g.model([g.relu(g.conv(p, net.fuse))])


def reader_graph(net: NumpyTypeReader) -> bytes:
    """High-pass patch (2 channels) -> stage 3's and stage 4's features (:meth:`NumpyTypeReader.read_map`)."""
    g = _Graph(2)
    f = g.blocks(_stem_to_stage2(g, net), net.stage3)
    return g.model([f, g.blocks(f, net.stage4)])


def validity_graph(net: NumpyValidityNet) -> bytes:
    """Prepared input (1 channel) -> the last block's features (:meth:`NumpyValidityNet.logit`)."""
    g = _Graph(1)
    return g.model([g.blocks(g.relu(g.conv("x", net.stem)), net.blocks)])


class OrtTrunk(Trunk):
    """One network's trunk in an ONNX Runtime session: ``(C, H, W)`` in, a list of ``(C', h, w)`` out.

    ``threads`` is the session's intra-op thread count (None: ONNX Runtime's default, one per physical core).
    Its threads sleep between runs rather than spin, so that a worker that waits for its next image does not
    hold the cores that the listener, the web server and the other workers need. A session's ``run`` may be
    called from several threads at once."""

    def __init__(self, model: bytes, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = int(threads)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: its optimiser's notes are not an operator's concern
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        batch = np.ascontiguousarray(x, dtype=np.float32)[None]
        return [out[0] for out in self.session.run(None, {"x": batch})]


def accelerate(net: NumpyFractureNet | NumpyTypeReader | NumpyValidityNet, threads: int | None = None) -> None:
    """Give ``net`` an ONNX Runtime trunk in place (its forward passes then run the trunk there)."""
    if isinstance(net, NumpyFractureNet):
        model = detector_graph(net)
    elif isinstance(net, NumpyTypeReader):
        model = reader_graph(net)
    else:
        model = validity_graph(net)
    net.trunk = OrtTrunk(model, threads)
