"""The ONNX operators the exported graphs may use: what TensorRT 10's ONNX parser supports.

Written from the operator support matrix of onnx-tensorrt for TensorRT 10 (`docs/operators.md`,
release 10.0/10.1: "opsets 9 to 20"), with the element types listed there for each operator's
data input. JetPack 6.1/6.2 ships TensorRT 10.3, whose matrix is a superset of this one.

Deliberately left out although TensorRT parses them, because an engine graph must have fixed,
input-derived shapes and deterministic output: data-dependent outputs (NonZero, NonMaxSuppression),
control flow (If, Loop, Scan) and random generators.
"""

from __future__ import annotations

# TensorRT 10's ONNX parser supports opsets 9 … 20 (inclusive).
MIN_OPSET = 9
MAX_OPSET = 20

_F = frozenset({"FLOAT", "FLOAT16", "BFLOAT16"})
_FI = _F | {"INT32", "INT64"}
_FIB = _FI | {"BOOL"}
_B = frozenset({"BOOL"})


def _names(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_GROUPS: dict[frozenset[str], tuple[str, ...]] = {
    _F: _names(
        "Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose Cos "
        "Cosh CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool "
        "GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf "
        "LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM LpNormalization LpPool MatMul MaxPool "
        "MeanVarianceNormalization ParametricSoftplus Pow PRelu Reciprocal Resize RNN Round ScaledTanh Selu "
        "Sigmoid Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample"
    ),
    frozenset({"FLOAT", "FLOAT16"}): ("DeformConv", "GridSample", "Mish", "RoiAlign"),
    _FI: _names(
        "Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max Mean "
        "Min Mod Mul Neg Pad Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean "
        "ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign "
        "SpaceToDepth Sub Sum TopK"
    ),
    _FIB: _names(
        "Concat Constant ConstantOfShape Expand EyeLike Flatten Gather GatherElements GatherND Identity "
        "OneHot Reshape ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where"
    ),
    _FIB | {"UINT8"}: ("Cast", "CastLike"),
    _B: ("And", "Not", "Or", "Xor"),
}

# op type → element types its data input may have.
SUPPORTED_OPS: dict[str, frozenset[str]] = {op: types for types, ops in _GROUPS.items() for op in ops}

# Supported by the parser but their output shape depends on tensor values (or they branch on them).
DATA_DEPENDENT_OPS = frozenset({"NonZero", "NonMaxSuppression", "Unique", "Compress", "If", "Loop", "Scan"})

# Which input carries the "data" whose element type the matrix restricts (default: input 0).
DATA_INPUT = {"Where": 1, "Constant": -1, "ConstantOfShape": -1, "Range": -1}

# Inputs that set an output *shape*: they must be derived from constants and input shapes only.
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "ConstantOfShape": (0,),
    "Tile": (1,),
    "Range": (0, 1, 2),
    "Resize": (2, 3),
    "Slice": (1, 2, 3, 4),
    "Pad": (1, 3),
    "Split": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "TopK": (1,),
    "OneHot": (1,),
    "ReduceSum": (1,),
    "ReduceMean": (1,),
    "ReduceMax": (1,),
    "ReduceMin": (1,),
    "ReduceProd": (1,),
    "ReduceL1": (1,),
    "ReduceL2": (1,),
    "ReduceLogSum": (1,),
    "ReduceLogSumExp": (1,),
    "ReduceSumSquare": (1,),
}

# Inputs the parser requires to be build-time constants (initializers or Constant nodes).
CONSTANT_INPUTS: dict[str, tuple[int, ...]] = {
    "CumSum": (1,),
    "Slice": (3,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    **{op: (1,) for op in SHAPE_INPUTS if op.startswith("Reduce")},
}

RESIZE_MODES = frozenset({"nearest", "linear"})
RESIZE_COORDINATE_MODES = frozenset(
    {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
)
