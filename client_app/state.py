"""Client-side optimizer state kept between rounds in ``context.state``, in quantized form."""

from __future__ import annotations

from flwr.app import RecordDict

from quantization import FP32, LowPrecisionOptimizer
from quantization.wire import FORMAT_SUFFIX, encode_tensors, read_tensors

STATE_KEY = "optimizer-state"


def save_optimizer_state(state: RecordDict, optimizer: LowPrecisionOptimizer) -> int:
    """Store the optimizer's state (BFP codes + exponents); returns its payload bytes."""
    arrays, formats = encode_tensors(optimizer.export_state(), FP32)
    state[STATE_KEY] = arrays
    state[STATE_KEY + FORMAT_SUFFIX] = formats
    return arrays.count_bytes()


def load_optimizer_state(state: RecordDict, optimizer: LowPrecisionOptimizer) -> bool:
    """Restore state saved by ``save_optimizer_state``; False if there is none."""
    if STATE_KEY not in state.array_records:
        return False
    tensors = read_tensors(
        state.array_records[STATE_KEY], state.config_records[STATE_KEY + FORMAT_SUFFIX]
    )
    optimizer.import_state(tensors)
    return True
