"""The integer path computes the fake-quant path's function: forward, grad-input, grad-weight."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from quantization import BlockFloat, TrainingPrecision, attach_quantizers, quantize, quantize_
from quantization.integer_arithmetic import IntegerArithmetic, attach_integer_arithmetic
from quantization.integer_ops import (
    codes_on_grid,
    int8_conv_problem,
    int8_products_problem,
    integer_layout_problem,
)

#: Conv layers need fast int8 products and oneDNN's int8 convolution, exact on this CPU (else
#: they stay float32).
needs_onednn = pytest.mark.skipif(int8_conv_problem() is not None, reason=str(int8_conv_problem()))


def precision(bits: int, weight_layout: str = "channel") -> TrainingPrecision:
    """Every role at ``bits``; weights per output channel (or ``weight_layout``)."""
    weight = BlockFloat(bits, layout=weight_layout)  # type: ignore[arg-type]
    flow = BlockFloat(bits, layout="tensor")
    return TrainingPrecision(weight=weight, grad=weight, activation=flow, error=flow, state=weight)


def spread_channels(layer: nn.Module, seed: int) -> None:
    """Scale output channels by different powers of two, so weights hold several exponents."""
    generator = torch.Generator().manual_seed(seed)
    shifts = torch.randint(-3, 3, (layer.weight.shape[0],), generator=generator)
    with torch.no_grad():
        layer.weight.mul_(
            torch.ldexp(torch.ones(()), shifts).reshape(-1, *[1] * (layer.weight.dim() - 1))
        )


def outputs_and_grads(
    make_layer, x: torch.Tensor, p: TrainingPrecision, integer: bool, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward/backward of ``make_layer()`` on an on-grid input, on either path."""
    layer = make_layer()
    for param in layer.parameters():
        quantize_(param.data, p.weight)
    model = nn.Sequential(layer)
    generator = torch.Generator().manual_seed(seed)
    hooks = attach_quantizers(model, p.activation, p.error, generator)
    attached = attach_integer_arithmetic(model, p) if integer else None
    x = quantize(x, p.activation, torch.Generator().manual_seed(seed + 1)).requires_grad_()
    out = model(x)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 2))
    (out * target).sum().backward()
    hooks.remove()
    if attached is not None:
        attached.remove()
        assert attached.routes["0"].integer_calls == 1  # the integer route really ran
    grads = [x.grad] + [param.grad for param in layer.parameters()]
    return out.detach(), grads


CONVS = [
    # (in, out, kernel, padding, dilation, bias, batch, side)
    (3, 5, 3, 1, 1, True, 2, 7),
    (7, 1, 3, 0, 1, False, 1, 6),
    (5, 9, 3, 2, 2, True, 3, 8),
    (4, 6, 1, 0, 1, True, 2, 5),
    (6, 3, 5, 2, 1, False, 1, 9),
]


def make_conv(c_in, c_out, kernel, padding, dilation, bias, seed):
    def make():
        torch.manual_seed(seed)
        conv = nn.Conv2d(c_in, c_out, kernel, padding=padding, dilation=dilation, bias=bias)
        spread_channels(conv, seed)
        return conv

    return make


@needs_onednn
@pytest.mark.parametrize("case", CONVS)
def test_conv_products_equal_fake_quant_exactly_where_both_are_exact(case):
    """At 4 bits every partial sum is a small integer number of steps: float32 is exact too."""
    c_in, c_out, kernel, padding, dilation, bias, batch, side = case
    make = make_conv(c_in, c_out, kernel, padding, dilation, bias, seed=sum(case[:5]))
    x = torch.randn(batch, c_in, side, side, generator=torch.Generator().manual_seed(7))
    p = precision(4)
    fake_out, fake_grads = outputs_and_grads(make, x, p, integer=False)
    int_out, int_grads = outputs_and_grads(make, x, p, integer=True)
    assert torch.equal(fake_out, int_out)
    for fake, integer in zip(fake_grads, int_grads, strict=True):
        assert torch.equal(fake, integer)


@needs_onednn
@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("weight_layout", ["channel", "tensor"])
def test_conv_products_match_at_8_bits_to_float32_accumulation(case, weight_layout):
    c_in, c_out, kernel, padding, dilation, bias, batch, side = case
    make = make_conv(c_in, c_out, kernel, padding, dilation, bias, seed=3)
    x = torch.randn(batch, c_in, side, side, generator=torch.Generator().manual_seed(11))
    p = precision(8, weight_layout)
    fake_out, fake_grads = outputs_and_grads(make, x, p, integer=False)
    int_out, int_grads = outputs_and_grads(make, x, p, integer=True)
    # the forward outputs pass the output quantizer: equal unless float32 rounding moved one
    # across a rounding boundary; compare the unrounded products through the gradients too
    torch.testing.assert_close(int_out, fake_out, rtol=0, atol=2 * fake_out.abs().max() / 64)
    for fake, integer in zip(fake_grads, int_grads, strict=True):
        torch.testing.assert_close(integer, fake, rtol=1e-5, atol=1e-6 * fake.abs().max())


@pytest.mark.parametrize(("rows", "features_in", "features_out", "bias"), [
    (1, 3, 5, True), (7, 33, 2, False), (5, 128, 11, True), (2, 1, 1, True),
])  # fmt: skip
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.usefixtures("int8_products_allowed")
def test_linear_products_equal_fake_quant(rows, features_in, features_out, bias, bits):
    def make():
        torch.manual_seed(features_in)
        linear = nn.Linear(features_in, features_out, bias=bias)
        spread_channels(linear, features_out)
        return linear

    x = torch.randn(rows, features_in, generator=torch.Generator().manual_seed(5))
    p = precision(bits)
    fake_out, fake_grads = outputs_and_grads(make, x, p, integer=False)
    int_out, int_grads = outputs_and_grads(make, x, p, integer=True)
    for fake, integer in zip([fake_out, *fake_grads], [int_out, *int_grads], strict=True):
        if bits == 4:
            assert torch.equal(fake, integer)
        else:
            torch.testing.assert_close(integer, fake, rtol=1e-5, atol=1e-6 * fake.abs().max())


def test_spread_weights_make_grad_input_take_one_product_per_exponent():
    """The equality tests above use such weights, so they cover the exponent groups."""
    from quantization.integer_ops import _exponent_groups

    conv = nn.Conv2d(4, 8, 3, padding=1)
    spread_channels(conv, 0)
    p = precision(8)
    quantize_(conv.weight.data, p.weight)
    codes = codes_on_grid(conv.weight, p.weight)
    assert codes is not None
    groups = _exponent_groups(codes)
    assert len(groups) == codes.steps.unique().numel() > 1
    channels = torch.cat([index for _, index in groups])
    assert torch.equal(channels.sort().values, torch.arange(8))


@needs_onednn
def test_layers_without_integer_route_fall_back_and_log_once(caplog):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # the model's input: off the activation grid
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 3),
    )
    p = precision(8)
    for param in model.parameters():
        quantize_(param.data, p.weight)
    hooks = attach_quantizers(model, p.activation, p.error, torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="quantization.integer_arithmetic"):
        attached = attach_integer_arithmetic(model, p)
        for _ in range(2):
            model(torch.randn(2, 3, 8, 8)).sum().backward()
    hooks.remove()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("layer 0:" in m and "input is not on its" in m for m in messages) == 1
    assert sum("layer 2:" in m and "grouped convolution" in m for m in messages) == 1
    assert sum("layer 4:" in m and "stride (2, 2)" in m for m in messages) == 1
    assert not any("layer 6:" in m for m in messages)
    assert set(attached.routes) == {"0", "4", "6"}
    assert attached.routes["4"].integer_calls == 2 and attached.routes["6"].integer_calls == 2
    attached.remove()
    assert all("forward" not in vars(m) for m in model.modules())


def test_weights_in_small_blocks_have_no_integer_product():
    assert integer_layout_problem(BlockFloat(8, layout="block"), (16, 16, 3, 3), True) is not None
    assert integer_layout_problem(BlockFloat(8, layout="channel"), (16, 16, 3, 3), True) is None
    assert integer_layout_problem(BlockFloat(8, layout="channel"), (4, 5), False) is not None
    assert integer_layout_problem(BlockFloat(16, layout="tensor"), (4, 5), False) is not None
    # two blocks for two rows, but the blocks do not follow the rows
    assert integer_layout_problem(BlockFloat(8, "block", block_size=6), (2, 5), True) is not None
    assert integer_layout_problem(BlockFloat(8, "block", block_size=5), (2, 5), True) is None


def record_parking(monkeypatch) -> list[int]:
    """A list that gets ``parked_bytes()`` after every ``IntegerArithmetic.park_weights``."""
    parked: list[int] = []
    park = IntegerArithmetic.park_weights

    def recording_park(self):
        park(self)
        parked.append(self.parked_bytes())

    monkeypatch.setattr(IntegerArithmetic, "park_weights", recording_park)
    return parked


@needs_onednn
def test_small_cnn_learns_mnist_on_the_integer_path_with_weights_on_their_grid(monkeypatch):
    from lowprec_fl.federated_data import load_image_data
    from lowprec_fl.models import SmallCNN
    from lowprec_fl.task.training import evaluate_model, make_optimizer, train_local
    from tests.shared_helpers import mnist_root

    root = mnist_root()
    train = load_image_data("mnist", root, train=True).subset(torch.arange(2000))
    test = load_image_data("mnist", root, train=False).subset(torch.arange(1000))
    torch.manual_seed(0)
    model = SmallCNN()
    p = precision(8)
    generator = torch.Generator().manual_seed(0)
    optimizer = make_optimizer(model, "adam", 1e-3, p, generator)
    calls: dict[str, int] = {}
    attach = attach_integer_arithmetic

    def counting_attach(m, prec):
        attached = attach(m, prec)
        calls["layers"] = len(attached)
        calls["routes"] = attached.routes
        return attached

    monkeypatch.setattr("quantization.attach.attach_integer_arithmetic", counting_attach)
    parked_after_steps = record_parking(monkeypatch)
    result = train_local(
        model, optimizer, train, p, epochs=1, batch_size=32, generator=generator,
        device=torch.device("cpu"), arithmetic="int8",
    )  # fmt: skip
    assert calls["layers"] == 3  # both convs and the classifier
    integer_calls = {name: r.integer_calls for name, r in calls["routes"].items()}
    assert (
        integer_calls["features.3"] == result.steps and integer_calls["classifier"] == result.steps
    )
    # the second conv's input and error came with their codes from the quantizers
    assert calls["routes"]["features.3"].attached_codes == 2 * result.steps
    assert calls["routes"]["classifier"].attached_codes == result.steps  # its error
    assert all("forward" not in vars(m) for m in model.modules())  # detached after training
    # between steps the integer layers' weights were codes only: int8 codes, a step a channel
    integer_weights = [model.features[3].weight, model.classifier.weight]
    codes_bytes = sum(w.numel() + 4 * w.shape[0] for w in integer_weights)
    assert parked_after_steps == [codes_bytes] * result.steps
    for param in model.parameters():
        assert torch.equal(quantize(param.data, BlockFloat(8, "channel", "nearest")), param.data)
    _, accuracy = evaluate_model(model, test, 256, torch.device("cpu"))
    assert accuracy > 0.75, accuracy  # chance: 0.1


class _TwoConvs(nn.Module):
    """conv -> GroupNorm -> ReLU -> pool -> conv (-> an in-place op on its input, optionally)."""

    def __init__(self, touch_in_place: bool = False) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.act = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.second = nn.Conv2d(8, 5, 3, padding=1)
        self.touch_in_place = touch_in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.act(self.norm(self.first(x))))
        if self.touch_in_place:
            h = h.mul_(1.0)  # same values, a new version: handed-over codes no longer count
        return self.second(h)


def _two_conv_run(keep_codes: bool, touch_in_place: bool = False):
    torch.manual_seed(3)
    model = _TwoConvs(touch_in_place)
    p = precision(8)
    for param in model.parameters():
        quantize_(param.data, p.weight)
    generator = torch.Generator().manual_seed(0)
    hooks = attach_quantizers(model, p.activation, p.error, generator, keep_codes=keep_codes)
    attached = attach_integer_arithmetic(model, p)
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    out = model(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    hooks.remove()
    attached.remove()
    return out.detach(), [q.grad for q in model.parameters()], attached.routes["second"]


@needs_onednn
@pytest.mark.parametrize("touch_in_place", [False, True])
def test_codes_handed_over_by_the_quantizers_give_the_same_numbers(touch_in_place):
    out, grads, route = _two_conv_run(keep_codes=True, touch_in_place=touch_in_place)
    want_out, want_grads, plain = _two_conv_run(keep_codes=False, touch_in_place=touch_in_place)
    assert torch.equal(out, want_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, want_grads, strict=True))
    assert route.integer_calls == plain.integer_calls == 1 and plain.attached_codes == 0
    # input and error codes; the input's were invalidated by the in-place op
    assert route.attached_codes == (1 if touch_in_place else 2)


@pytest.mark.usefixtures("int8_products_allowed")
def test_conv_layers_stay_float32_where_onednn_is_inexact(monkeypatch, caplog):
    monkeypatch.setattr(
        "quantization.integer_ops.onednn_int8_conv_exact", lambda: "inexact on this CPU (test)"
    )
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    with caplog.at_level(logging.INFO, logger="quantization.integer_arithmetic"):
        attached = attach_integer_arithmetic(model, precision(8))
    assert set(attached.routes) == {"2"}
    assert any("layer 0:" in r.getMessage() and "inexact" in r.getMessage() for r in caplog.records)


def test_layers_stay_float32_without_int8_dot_product_instructions(monkeypatch, caplog):
    monkeypatch.setattr("quantization.integer_ops.int8_products_problem", lambda: "no VNNI (test)")
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    with caplog.at_level(logging.INFO, logger="quantization.integer_arithmetic"):
        attached = attach_integer_arithmetic(model, precision(8))
    assert attached.routes == {}
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(":")[0] for m in messages if "no VNNI (test)" in m] == ["layer 0", "layer 2"]


@pytest.mark.parametrize(
    ("capabilities", "gated"),
    [
        ({"architecture": "x86_64", "avx2": True, "cpu_name": "AMD EPYC"}, True),
        ({"architecture": "x86_64", "avx2": True, "avx512_vnni": True}, False),
        ({"architecture": "x86_64", "avx_vnni": True}, False),
        ({"architecture": "x86_64", "amx_int8": True}, False),
        ({"architecture": "aarch64", "neon": True}, False),
    ],
)
def test_int8_products_need_dot_product_instructions_on_x86(monkeypatch, capabilities, gated):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    problem = int8_products_problem.__wrapped__()
    assert (problem is not None) == gated
    if gated:
        assert "AMD EPYC has no int8 dot-product instructions" in problem
        assert "avx512_vnni, avx_vnni, amx_int8" in problem


@needs_onednn
def test_clients_on_the_integer_path_upload_updates_the_server_accepts(tmp_path, caplog):
    """Real ServerApp and ClientApp in process: int8 arithmetic changes no message or file."""
    import json

    from flwr.app import Context, RecordDict

    from client_app.app import app as client_app
    from scripts.task_identity import task_identity
    from server_app.app import main
    from tests.flower_harness import InProcessGrid

    run_config = {
        "overrides": "dataset=synthetic model=small_cnn federation.num_rounds=2 "
        "federation.num_clients=2 federation.fraction_train=1 train.max_steps=3 "
        "train.arithmetic=int8 quantization.weight_layout=channel",
        "output-dir": str(tmp_path),
    }
    threads = torch.get_num_threads()
    with caplog.at_level(logging.INFO, logger="quantization.integer_arithmetic"):
        try:
            with task_identity():
                main(
                    InProcessGrid(client_app, 2, run_config),
                    Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                            run_config=run_config),
                )  # fmt: skip
        finally:
            torch.set_num_threads(threads)
    rows = json.loads((tmp_path / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]  # round 0: the initial model
    assert all(r["rejected_updates"] == 0 and r["failed_clients"] == 0 for r in rows)
    # the clients did train on the integer path: only the model's first conv fell back
    fallbacks = {
        r.getMessage().split(":")[0]
        for r in caplog.records
        if r.name == "quantization.integer_arithmetic"
    }
    assert fallbacks == {"layer features.0"}, fallbacks


def test_config_refuses_int8_arithmetic_on_weight_blocks_and_names_the_fix():
    from lowprec_fl.task.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="weight_layout=channel"):
        load_config({"overrides": "dataset=synthetic train.arithmetic=int8"})
    with pytest.raises(ConfigError, match="train.arithmetic"):
        load_config({"overrides": "dataset=synthetic train.arithmetic=int4"})
    cfg = load_config(
        {"overrides": "dataset=synthetic train.arithmetic=int8 quantization.weight_layout=channel"}
    )
    assert cfg.train.arithmetic == "int8"


# ------------------------------------------------------------------ weights as codes between steps
def _small_mlp() -> nn.Sequential:
    """Its first layer reads the raw input, so it computes in float32; the second reads the
    quantized ReLU output, so on integers."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))


def _mlp_training(park: bool, model: nn.Sequential | None = None, steps: int = 3):
    """``steps`` Adam steps of a Linear/ReLU ``model`` (default ``_small_mlp()``) on the int8
    path, stepping through ``optimizer_step``; returns (model, layers, optimizer)."""
    from quantization import LowPrecisionOptimizer, attach_low_precision

    model = model if model is not None else _small_mlp()
    features, classes = model[0].in_features, model[-1].out_features
    p, generator = precision(8), torch.Generator().manual_seed(4)
    layers = attach_low_precision(model, p, generator, arithmetic="int8")
    opt = LowPrecisionOptimizer.from_precision(
        torch.optim.Adam(model.parameters(), lr=1e-2), p, generator
    )
    data = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randn(8, features, generator=data)
        y = torch.randint(0, classes, (8,), generator=data)
        opt.zero_grad()
        with layers.forward():
            nn.functional.cross_entropy(model(x), y).backward()
        layers.optimizer_step(opt, park_weights=park)
    return model, layers, opt


@pytest.mark.usefixtures("int8_products_allowed")
def test_integer_layers_keep_their_weights_as_codes_between_steps_and_train_the_same():
    model, layers, _ = _mlp_training(park=True)
    head = model[2].weight
    assert head.untyped_storage().nbytes() == 4  # a placeholder: no float32 copy is kept
    assert head.shape == (5, 16) and torch.isnan(head).all()  # a read would show at once
    assert layers.parked_weight_bytes() == 5 * 16 + 5 * 4  # int8 codes, one step a channel
    assert model[0].weight.untyped_storage().nbytes() == 16 * 12 * 4  # float32 route: float32
    parked = layers.integer.routes["2"].parked
    layers.remove()  # unparks
    assert head.untyped_storage().nbytes() == 5 * 16 * 4
    assert torch.equal(head, parked.decode())

    reference, plain_layers, _ = _mlp_training(park=False)
    assert plain_layers.parked_weight_bytes() == 0
    plain_layers.remove()
    for got, want in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(got, want)  # parking changes no number


@pytest.mark.usefixtures("int8_products_allowed")
def test_a_parked_weight_comes_back_when_its_layer_computes_in_float32():
    model, layers, _ = _mlp_training(park=True)
    head, route = model[2], layers.integer.routes["2"]
    want = route.parked.decode()
    x = torch.randn(3, 16)  # off the activation grid: the float32 route, which needs values
    out = head(x)
    assert route.parked is None and torch.equal(head.weight, want)
    plain = nn.functional.linear(x, want, head.bias)  # out went through its 8-bit quantizer
    torch.testing.assert_close(out, plain, rtol=0, atol=2 * float(plain.abs().max()) / 64)
    layers.remove()


def _train_local_both_ways(make_model, image_side: int, proximal_mu: float = 0.0):
    """The state dicts ``train_local`` trains at 4 bits on either arithmetic."""
    from lowprec_fl.federated_data.images import ImageData
    from lowprec_fl.task.training import make_optimizer, train_local

    data = torch.Generator().manual_seed(6)
    side = (48, 1, image_side, image_side)
    images = torch.randint(0, 256, side, dtype=torch.uint8, generator=data)
    labels = torch.randint(0, 3, (48,), generator=data)
    train = ImageData(images, labels, (0.5,), (0.25,), 3)
    models = {}
    for arithmetic in ("fake", "int8"):
        torch.manual_seed(7)
        model = make_model()
        generator = torch.Generator().manual_seed(8)
        optimizer = make_optimizer(model, "adam", 1e-2, precision(4), generator)
        train_local(
            model, optimizer, train, precision(4), epochs=2, batch_size=8, generator=generator,
            device=torch.device("cpu"), proximal_mu=proximal_mu, arithmetic=arithmetic,
        )  # fmt: skip
        models[arithmetic] = model.state_dict()
    return models


@pytest.mark.usefixtures("int8_products_allowed")
@pytest.mark.parametrize("proximal_mu", [0.0, 0.5])
def test_train_local_on_integers_equals_fake_quantization_at_4_bits(monkeypatch, proximal_mu):
    """Where both paths are exact (4 bits), the ClientApp's loop trains the same model on
    either, with weights parked as codes between steps, or (FedProx, whose drift term reads
    the float32 weights) not parked."""
    parked = record_parking(monkeypatch)
    models = _train_local_both_ways(
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 9), nn.ReLU(), nn.Linear(9, 3)),
        image_side=4,
        proximal_mu=proximal_mu,
    )
    for name, value in models["fake"].items():
        assert torch.equal(models["int8"][name], value), name
    steps = 2 * 48 // 8
    # the second layer's weight (9 -> 3) was parked after every step, except under FedProx
    assert parked == ([] if proximal_mu else [3 * 9 + 3 * 4] * steps)


@pytest.mark.usefixtures("int8_products_allowed")
def test_train_local_through_relu_bit_masks_and_shape_only_pooling_equals_fake_quantization():
    """conv -> ReLU (bit mask, quantizer fused in) -> AvgPool2d (shape only) -> conv: the
    int8 path's memory-lean backward computes what the fake-quant path does, at 4 bits."""

    def make_model() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                             nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(5 * 3 * 3, 3))  # fmt: skip

    models = _train_local_both_ways(make_model, image_side=6)
    for name, value in models["fake"].items():
        assert torch.equal(models["int8"][name], value), name


@pytest.mark.usefixtures("int8_products_allowed")
def test_a_weight_other_modules_share_is_never_parked():
    def train(park: bool):
        torch.manual_seed(9)
        a, b = nn.Linear(6, 6), nn.Linear(6, 6)
        b.weight = a.weight  # tied
        model = nn.Sequential(a, nn.ReLU(), b, nn.ReLU(), nn.Linear(6, 2))
        _, layers, _ = _mlp_training(park, model)
        parked = layers.parked_weight_bytes()
        assert layers.integer.routes["2"].integer_calls == 3  # the tied layer ran on integers
        layers.remove()
        return model.state_dict(), parked

    got, parked = train(park=True)
    want, _ = train(park=False)
    assert parked == 2 * 6 + 2 * 4  # the head's weight only: 12 codes and 2 steps
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def test_a_parked_weight_reads_nan_and_unparks_in_its_memory_layout():
    from quantization.integer_arithmetic import _Route

    p = precision(8)
    conv = nn.Conv2d(3, 4, 3)
    weight = conv.weight
    with torch.no_grad():
        weight.data = weight.data.contiguous(memory_format=torch.channels_last)
        quantize_(weight.data, p.weight)
    before = weight.detach().clone()
    route = _Route("conv", p)
    route.park(weight)
    assert route.parked is not None and weight.untyped_storage().nbytes() == 4
    assert weight.shape == before.shape and torch.isnan(weight).all()
    route.unpark(weight)
    assert torch.equal(weight, before)
    assert weight.is_contiguous(memory_format=torch.channels_last)
