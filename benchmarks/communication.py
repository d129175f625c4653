"""Bytes on the wire per model update: Flower-serialized messages at 8, 6 and 4 bits vs float32.

Run ``python -m benchmarks.communication`` (seconds, no data). For each model (the demo's small
CNN, the paper's ConvNet, ResNet-18) and precision it encodes the state dict exactly as a
client's upload is encoded (``conf/quantization/bfp*.yaml``: codes + block exponents + per-array
format records, quantized from float weights), serializes the message content with Flower's own
protobuf encoder and divides by the same model sent as a float32 ArrayRecord. Framing and
exponents are included. Writes ``benchmarks/results/communication.json``.
"""

from __future__ import annotations

import argparse
import time

import torch
from flwr.app import RecordDict
from omegaconf import OmegaConf

from benchmarks.report import RESULTS_DIR, Figure, print_figures, write_results
from lowprec_fl.models import build_model
from lowprec_fl.task.config import load_config
from lowprec_fl.task.formats import uplink_format
from lowprec_fl.task.model import float_buffer_names
from lowprec_fl.wire import FORMAT_SUFFIX, encode_tensors, float32_size, serialized_size

RESULTS_PATH = RESULTS_DIR / "communication.json"
#: model -> (channels, classes, image size) of the data it is used with here
MODELS = {"small_cnn": (1, 10, 28), "convnet": (1, 10, 32), "resnet18": (3, 10, 32)}
PRECISIONS = ("bfp8", "bfp6", "bfp4")
KEY = "arrays"


def upload_bytes(model_name: str, precision: str) -> tuple[int, int]:
    """(serialized bytes of the encoded upload, of the same model in float32)."""
    cfg = load_config({"overrides": f"model={model_name} quantization={precision}"})
    options = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(0)
    model = build_model(options.pop("name"), *MODELS[model_name], **options)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    arrays, formats = encode_tensors(
        state,
        uplink_format(cfg.quantization),
        torch.Generator().manual_seed(0),
        keep_float=float_buffer_names(model),
    )
    content = RecordDict({KEY: arrays, KEY + FORMAT_SUFFIX: formats})
    return serialized_size(content), float32_size(state, KEY)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.communication`` (no options)."""
    return argparse.ArgumentParser(
        prog="python -m benchmarks.communication", description=__doc__.splitlines()[0]
    )


def main(argv: list[str] | None = None) -> None:
    """Measure every model and precision, print the figures and save them."""
    build_parser().parse_args(argv)
    start = time.perf_counter()
    figures = []
    for model_name in MODELS:
        for precision in PRECISIONS:
            encoded, fp32 = upload_bytes(model_name, precision)
            figures += [
                Figure(f"{model_name}_{precision}_bytes", float(encoded), "B"),
                Figure(f"{model_name}_{precision}_vs_fp32", encoded / fp32, "x"),
            ]
        figures.append(Figure(f"{model_name}_fp32_bytes", float(fp32), "B"))
    print_figures(figures)
    print(f"wrote {write_results(figures, time.perf_counter() - start, RESULTS_PATH)}")


if __name__ == "__main__":
    main()
