"""mnist-lowprec: A Flower / PyTorch app."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, Strategy

from mnist_lowprec.task import FMT, Net
from strategies import QuantizedMessages

# Create ServerApp
app = ServerApp()
# The same app with central DP and client-side clipping (client: client_app.dp_app).
dp_app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""
    strategy = FedAvg(fraction_train=context.run_config["fraction-train"])
    run(grid, context, strategy)


@dp_app.main()
def dp_main(grid: Grid, context: Context) -> None:
    """FedAvg with central DP: the clients clip their updates, the server adds noise."""
    strategy = DifferentialPrivacyClientSideFixedClipping(
        FedAvg(fraction_train=context.run_config["fraction-train"]),
        noise_multiplier=context.run_config["dp.noise-multiplier"],
        clipping_norm=context.run_config["dp.clipping-norm"],
        num_sampled_clients=context.run_config["dp.num-sampled-clients"],
    )
    run(grid, context, strategy)


def run(grid: Grid, context: Context, strategy: Strategy) -> None:
    """Run ``strategy`` for ``num-server-rounds`` rounds; save the model and the metrics."""
    torch.manual_seed(context.run_config["seed"])
    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())
    strategy = QuantizedMessages(strategy, uplink=FMT, downlink=FMT)

    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": context.run_config["lr"]}),
        num_rounds=context.run_config["num-server-rounds"],
    )

    out = Path(context.run_config["output-dir"] or "outputs").expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"\nSaving the final model and the metrics to {out}")
    torch.save(result.arrays.to_torch_state_dict(), out / "final_model.pt")
    metrics = {
        "train": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        "evaluate": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
    }
    (out / "results.json").write_text(json.dumps(metrics, indent=1))
