"""The NumPy networks' convolutional trunks run by ONNX Runtime: the ``onnx`` model runtime.

The convolutions are nearly all of a forward pass, and ONNX Runtime's CPU kernels run them 2.2-2.5 times
faster than im2col with NumPy's BLAS on the same two cores (``bench/bench_inference.py``'s fracture-models
stage; docs/MODELS.md, "Inference speed"). This module
writes each NumPy network's trunk (its folded convolutions, ReLUs, residual sums and the detector's
top-down pyramid) as an ONNX graph, in memory, from the very arrays the NumPy network holds: the verified
``weights.safetensors`` stays the one source of the weights, and no file is added to a bundle. Everything else
(the high-pass input, the heads, Grad-CAM in closed form) stays in :mod:`pipeline.models.numpy_nets`, so the
two runtimes differ only in how the trunk's arithmetic is ordered (tests hold them to 1e-4).

ONNX Runtime is imported only when a bundle is loaded into this runtime.
"""

from __future__ import annotations

import os

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
IR_VERSION = 8  # ONNX Runtime reads IR 8 with opset 17 on every release this project allows
FLOAT, INT64 = 1, 7  # TensorProto.DataType
ATTR_INT, ATTR_INTS = 2, 7  # AttributeProto.AttributeType


# The graph is written in protobuf's wire format by the few lines below rather than with the ``onnx`` package:
# that package alone would add about 17 MiB to every worker, and the tests check what these lines write with
# it (``onnx.checker``). Field numbers are those of onnx/onnx.proto.


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 as two's complement
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _tensor(name: str, value: np.ndarray) -> bytes:
    """TensorProto: dims (1), data_type (2), name (8), raw_data (9, little-endian)."""
    kind = {np.dtype(np.float32): FLOAT, np.dtype(np.int64): INT64}[value.dtype]
    dims = b"".join(_int(1, d) for d in value.shape)
    raw = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
    return dims + _int(2, kind) + _bytes(8, name) + _bytes(9, raw)


def _value_info(name: str, shape: list[int | str | None]) -> bytes:
    """ValueInfoProto (name 1, type 2) of a float tensor: TypeProto.tensor_type (1) with elem_type (1) and shape
    (2) of dims (1), each a dim_value (1), a dim_param (2) or (None) unknown."""
    dims = b"".join(_bytes(1, b"" if d is None else _bytes(2, d) if isinstance(d, str) else _int(1, d))
                    for d in shape)
    return _bytes(1, name) + _bytes(2, _bytes(1, _int(1, FLOAT) + _bytes(2, dims)))


def _attribute(name: str, value: int | list[int]) -> bytes:
    """AttributeProto: name (1), i (3) or ints (8), type (20)."""
    if isinstance(value, list):
        return _bytes(1, name) + b"".join(_int(8, v) for v in value) + _int(20, ATTR_INTS)
    return _bytes(1, name) + _int(3, value) + _int(20, ATTR_INT)


class _Graph:
    """An ONNX graph being written: one float32 input ``x`` (N, C, H, W) with free N, H and W."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.nodes: list[bytes] = []
        self.initializers: list[bytes] = []
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, value: np.ndarray) -> str:
        name = self._name("c")
        self.initializers.append(_tensor(name, value))
        return name

    def op(self, op_type: str, *inputs: str, **attrs: int | list[int]) -> str:
        """NodeProto: input (1), output (2), name (3), op_type (4), attribute (5)."""
        out = self._name(op_type.lower())
        self.nodes.append(b"".join(_bytes(1, i) for i in inputs) + _bytes(2, out) + _bytes(3, out)
                          + _bytes(4, op_type) + b"".join(_bytes(5, _attribute(k, v)) for k, v in attrs.items()))
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
        """ModelProto: ir_version (1), producer_name (2), graph (7), opset_import (8: domain 1, version 2). Its
        GraphProto: node (1), name (2), initializer (5), input (11), output (12)."""
        graph = (b"".join(_bytes(1, n) for n in self.nodes) + _bytes(2, "trunk")
                 + b"".join(_bytes(5, t) for t in self.initializers)
                 + _bytes(11, _value_info("x", ["n", self.channels, "h", "w"]))
                 + b"".join(_bytes(12, _value_info(name, ["n", None, None, None])) for name in outputs))
        return (_int(1, IR_VERSION) + _bytes(2, "fracture-node") + _bytes(7, graph)
                + _bytes(8, _bytes(1, "") + _int(2, OPSET)))


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
    hold the cores that the listener, the web server and the other workers need (spinning threads also made the
    three sessions of one image slower: 114-132 ms for the networks against 66-80 ms, docs/MODELS.md). A
    session's ``run`` may be called from several threads at once."""

    def __init__(self, model: bytes, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = int(threads)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No arena: the memory of a pass goes back when it ends rather than being kept for the largest input seen
        # (16 MiB less held after twelve images in a throw-away comparison on session 23's Xeon, with no speed
        # difference beyond that machine's noise).
        options.enable_cpu_mem_arena = False
        options.log_severity_level = 3  # errors only: its optimiser's notes are not an operator's concern
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        batch = np.ascontiguousarray(x, dtype=np.float32)[None]
        return [out[0] for out in self.session.run(None, {"x": batch})]


def accelerate(net: NumpyFractureNet | NumpyTypeReader | NumpyValidityNet, threads: int | None = None,
               release: bool = True) -> None:
    """Give ``net`` an ONNX Runtime trunk in place: its forward passes then run the trunk there, and with
    ``release`` NumPy's copy of the trunk's weights is let go (about 6 MiB for the bundled networks)."""
    if isinstance(net, NumpyFractureNet):
        model = detector_graph(net)
    elif isinstance(net, NumpyTypeReader):
        model = reader_graph(net)
    else:
        model = validity_graph(net)
    trunk = OrtTrunk(model, threads)
    if release:
        net.hand_over_trunk(trunk)
    else:
        net.trunk = trunk


def accelerate_in_this_process(net: NumpyFractureNet | NumpyTypeReader | NumpyValidityNet) -> None:
    """Give ``net`` (a NumPy network loaded before a fork) a one-thread ONNX Runtime trunk of this process's own,
    once per process: an ONNX Runtime session is not carried safely across ``fork``, so each forked worker of a
    training command's peak search builds its own, and NumPy's weights stay for the next fork."""
    pid = os.getpid()
    if getattr(net, "trunk_pid", None) != pid:
        accelerate(net, threads=1, release=False)
        net.trunk_pid = pid  # type: ignore[union-attr]
