"""Low-precision numerics: block floating point, exact wire codec, low-precision optimizer.

Three ideas, as in QPyTorch: a number format (``BlockFloat``), a quantizer (``quantize`` for
values, ``encode``/``QuantizedTensor`` for codes, ``attach_quantizers`` for activations and
errors) and an optimizer wrapper (``LowPrecisionOptimizer``).
"""

from .attach import LowPrecisionLayers, attach_low_precision
from .codec import QuantizedTensor, decode, encode
from .fake_quant import Quantizer, attach_quantizers, quantize_flow
from .format import FP32, BlockFloat
from .optimizer import LowPrecisionOptimizer
from .precision import TrainingPrecision
from .quantizer import block_exponents, quantize, quantize_, quantize_codes, torch_backend
from .state_codec import (
    LowBitState,
    QuantizedState,
    StateFormat,
    decode_states,
    quantize_state,
    quantize_states,
)

__all__ = [
    "FP32",
    "BlockFloat",
    "LowBitState",
    "LowPrecisionLayers",
    "LowPrecisionOptimizer",
    "QuantizedState",
    "QuantizedTensor",
    "Quantizer",
    "StateFormat",
    "TrainingPrecision",
    "attach_low_precision",
    "attach_quantizers",
    "block_exponents",
    "decode",
    "decode_states",
    "encode",
    "quantize",
    "quantize_",
    "quantize_codes",
    "quantize_flow",
    "quantize_state",
    "quantize_states",
    "torch_backend",
]
