"""This app's server strategy: the four wrappers composed around a Flower strategy."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flwr.serverapp.strategy import Strategy

from lowprec_fl.wire import TensorSpec
from quantization import BlockFloat

from .moving_average import ServerMovingAverage
from .quantized_messages import QuantizedMessages, RoundTraffic, Weighting
from .run import ResumableRun
from .sampling import ReproducibleSampling
from .update_guard import UpdateGuard
from .wrapper import find_wrapper


class LowPrecisionStrategy(ResumableRun):
    """``ResumableRun(ServerMovingAverage(ReproducibleSampling(QuantizedMessages(inner))))``.

    From the outside in: round numbering and lineage across resumptions; the float32 moving
    average (what is broadcast and evaluated); reproducible client sampling; quantized
    messages (encoded broadcast, validated and counted replies); then ``inner``, any Flower
    strategy (or Flower's DP wrappers around one), which aggregates in float32. Each block
    is usable alone; ``messages``, ``moving_average`` and ``sampling`` reach them here.
    """

    def __init__(
        self,
        inner: Strategy,
        template: Mapping[str, TensorSpec],
        uplink: BlockFloat,
        downlink: BlockFloat,
        moving_average: float = 0.0,
        moving_average_start: int = 1,
        moving_average_warmup: bool = False,
        accepted_bits: Iterable[int] = (),
        weighting: Weighting = "num-examples",
        float_buffers: Iterable[str] = (),
        max_update_bytes: int | None = None,
        seed: int = 0,
        guard: UpdateGuard | None = None,
        max_failed_rounds: int = 3,
    ) -> None:
        messages = QuantizedMessages(
            inner,
            template,
            uplink,
            downlink,
            accepted_bits=accepted_bits,
            weighting=weighting,
            float_buffers=float_buffers,
            max_update_bytes=max_update_bytes,
            seed=seed,
            guard=guard,
            max_failed_rounds=max_failed_rounds,
        )
        super().__init__(
            ServerMovingAverage(
                ReproducibleSampling(messages, seed=seed),
                decay=moving_average,
                start_round=moving_average_start,
                warmup=moving_average_warmup,
            )
        )
        self.inner = inner

    @property
    def messages(self) -> QuantizedMessages:
        """The quantized-messages block (formats, guard, per-round ``traffic``)."""
        return find_wrapper(self, QuantizedMessages)

    @property
    def moving_average(self) -> ServerMovingAverage:
        """The moving-average block."""
        return find_wrapper(self, ServerMovingAverage)

    @property
    def sampling(self) -> ReproducibleSampling:
        """The client-sampling block."""
        return find_wrapper(self, ReproducibleSampling)

    @property
    def traffic(self) -> dict[int, RoundTraffic]:
        """Each round's bytes, rejections and failures (``messages.traffic``)."""
        return self.messages.traffic
