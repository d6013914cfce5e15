import re
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

from singledir import find_layers, models

try:
    import torchvision
except ImportError:
    torchvision = None

requires_torchvision = pytest.mark.skipif(
    torchvision is None,
    reason='torchvision is not installed: pip install "singledir[vision]"',
)

BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def count_batch_norm(model: nn.Module) -> int:
    return sum(isinstance(module, BATCH_NORM_TYPES) for module in model.modules())


def output_shape(model: nn.Module, inputs: torch.Tensor) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(model(inputs).shape)


def forward_hook_counts(model: nn.Module) -> dict[str, int]:
    return {
        name: len(module._forward_hooks) + len(module._forward_pre_hooks)
        for name, module in model.named_modules()
    }


@pytest.fixture(scope="module")
def resnet18():
    return models.torchvision_classifier("resnet18", classes=10)


@pytest.fixture(scope="module")
def resnet50():
    return models.resnet50(classes=10)


@pytest.fixture(scope="module")
def vgg11():
    return models.torchvision_classifier("vgg11", classes=10)


@pytest.fixture(scope="module")
def mobilenet_v2():
    return models.torchvision_classifier("mobilenet_v2", classes=10)


# build_model: mlp


@pytest.mark.parametrize(("input_shape", "features"), [((1, 28, 28), 784), ((40,), 40)])
def test_mlp_output_shape(input_shape, features):
    model = models.build_model("mlp", input_shape, 7, hidden=(16, 8))
    assert model.fc1.in_features == features
    assert output_shape(model, torch.zeros(3, *input_shape)) == (3, 7)


def test_mlp_width_scales_hidden_layers():
    model = models.build_model("mlp", (40,), 3, width=0.5, hidden=(10, 6))
    assert model.fc1.out_features == 5
    assert model.fc2.out_features == 3
    assert model.out.in_features == 3


def test_mlp_width_keeps_one_unit():
    model = models.build_model("mlp", (40,), 3, width=0.01, hidden=(10, 6))
    assert model.fc1.out_features == 1
    assert model.fc2.out_features == 1


def test_mlp_batch_norm_off_by_default():
    default = models.build_model("mlp", (40,), 3, hidden=(8,))
    with_norm = models.build_model("mlp", (40,), 3, hidden=(8,), batch_norm=True)
    assert count_batch_norm(default) == 0
    assert isinstance(with_norm.bn1, nn.BatchNorm1d)


def test_mlp_dropout_is_passed_on():
    model = models.build_model("mlp", (40,), 3, hidden=(8,), dropout=0.2)
    assert isinstance(model.dropout1, nn.Dropout)
    assert model.dropout1.p == 0.2


def test_mlp_rejects_non_positive_width():
    message = "Expected width to be a positive float, but got 0.0."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.build_model("mlp", (40,), 3, width=0.0)


def test_mlp_invalid_hidden_reaches_mlp_check():
    message = (
        "Expected hidden to be a non-empty sequence of positive integers, but got "
        "('a',)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.build_model("mlp", (40,), 3, hidden=("a",))


# build_model and cnn11


@pytest.mark.parametrize(
    ("input_shape", "final_size"),
    [
        # Each side shrinks as ceil(side / 2) at the three stride-2 layers.
        ((1, 28, 28), (4, 4)),
        ((1, 8, 8), (1, 1)),
        ((3, 32, 32), (4, 4)),
        ((1, 20, 28), (3, 4)),
    ],
)
def test_cnn11_output_shape(input_shape, final_size):
    model = models.build_model("cnn11", input_shape, 10, width=0.125)
    assert model.conv1.in_channels == input_shape[0]
    assert model.fc.in_features == 64 * final_size[0] * final_size[1]
    assert output_shape(model, torch.zeros(2, *input_shape)) == (2, 10)


def test_cnn11_int_image_size_unchanged():
    model = models.cnn11()
    assert model.fc.in_features == 512 * 4 * 4
    assert output_shape(model, torch.zeros(1, 3, 32, 32)) == (1, 10)


def test_cnn11_module_names_unchanged():
    conv_layers = [
        f"{kind}{index}" for index in range(1, 12) for kind in ("conv", "bn", "relu")
    ]
    head = ["flatten", "fc", "fc_relu", "out"]
    model = models.cnn11(width=0.125)
    plain = models.cnn11(width=0.125, batch_norm=False)
    assert [name for name, _ in model.named_children()] == conv_layers + head
    assert [name for name, _ in plain.named_children()] == [
        name for name in conv_layers if not name.startswith("bn")
    ] + head
    assert models.CNN11_LAYERS == ("relu9", "relu10", "relu11")


def test_cnn11_width_scales_channels():
    model = models.build_model("cnn11", (3, 32, 32), 10, width=0.25)
    channels = [
        model.get_submodule(f"conv{index}").out_channels for index in range(1, 12)
    ]
    assert channels == [16, 16, 32, 32, 32, 64, 64, 64, 128, 128, 128]
    assert models.CNN11_CHANNELS == (
        64,
        64,
        128,
        128,
        128,
        256,
        256,
        256,
        512,
        512,
        512,
    )
    assert models.CNN11_STRIDES == (1, 1, 2, 1, 1, 2, 1, 1, 2, 1, 1)


def test_cnn11_width_keeps_one_channel():
    model = models.build_model("cnn11", (1, 8, 8), 10, width=0.001)
    assert all(
        model.get_submodule(f"conv{index}").out_channels == 1 for index in range(1, 12)
    )


def test_cnn11_batch_norm_on_by_default():
    default = models.build_model("cnn11", (1, 8, 8), 10, width=0.125)
    plain = models.build_model("cnn11", (1, 8, 8), 10, width=0.125, batch_norm=False)
    assert count_batch_norm(default) == 11
    assert count_batch_norm(plain) == 0
    assert default.conv1.bias is None
    assert plain.conv1.bias is not None


def test_cnn11_rejects_flat_input():
    message = (
        "Model 'cnn11' takes images of shape (channels, height, width), but the input "
        "shape is (40,). Use --model mlp for inputs that are not images."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.build_model("cnn11", (40,), 10)


def test_cnn11_rejects_invalid_image_size():
    message = (
        "Expected image_size to be a positive integer or a (height, width) pair of "
        "positive integers, but got (20, 0)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.cnn11(image_size=(20, 0))


@pytest.mark.parametrize(
    "name", ["cnn11", pytest.param("resnet18", marks=requires_torchvision)]
)
def test_dropout_rejected_outside_mlp(name):
    message = (
        f"Dropout applies to the mlp model only, but got dropout=0.5 for model "
        f"'{name}'. Use the mlp model (--model mlp) for dropout."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.build_model(name, (3, 32, 32), 10, dropout=0.5)


@requires_torchvision
def test_width_rejected_for_torchvision():
    message = (
        "The width multiplier (--width) applies to the mlp and cnn11 models only, but "
        "got width=0.5 for model 'resnet18'. Pass width 1 (--width 1) for this model."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.build_model("resnet18", (3, 32, 32), 10, width=0.5)


@requires_torchvision
def test_unknown_model_name():
    message = (
        "Unknown model 'resnet51'. Pass one of mlp, cnn11, resnet50, or the name of "
        "any torchvision classification model, such as resnet18 or vgg11."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.build_model("resnet51", (3, 32, 32), 10)


def test_invalid_input_shape():
    message = (
        "Expected input_shape to be a non-empty tuple of positive integers, such as "
        "(1, 28, 28), but got (1, 0, 28)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.build_model("mlp", (1, 0, 28), 10)


def test_models_offered_by_name():
    assert models.MODELS == ("mlp", "cnn11", "resnet50")


# torchvision models


@requires_torchvision
def test_resnet50_one_channel_output_shape():
    model = models.resnet50(classes=10, in_channels=1)
    assert output_shape(model, torch.zeros(2, 1, 28, 28)) == (2, 10)


@requires_torchvision
def test_resnet18_one_channel_replaces_conv1():
    original = models.torchvision_classifier("resnet18", classes=10).conv1
    model = models.build_model("resnet18", (1, 28, 28), 10)
    conv = model.conv1
    assert conv.in_channels == 1
    assert conv.out_channels == original.out_channels == 64
    assert conv.kernel_size == original.kernel_size == (7, 7)
    assert conv.stride == original.stride == (2, 2)
    assert conv.padding == original.padding == (3, 3)
    assert conv.bias is None
    assert output_shape(model, torch.zeros(2, 1, 28, 28)) == (2, 10)


@requires_torchvision
def test_first_conv_found_when_nested():
    model = models.torchvision_classifier("mobilenet_v2", classes=5, in_channels=2)
    conv = model.features[0][0]
    assert conv.in_channels == 2
    assert conv.out_channels == 32
    assert conv.stride == (2, 2)
    assert output_shape(model, torch.zeros(2, 2, 32, 32)) == (2, 5)


@requires_torchvision
def test_three_channels_keep_first_conv():
    model = models.build_model("resnet18", (3, 32, 32), 4)
    assert model.conv1.in_channels == 3
    assert model.fc.out_features == 4


@requires_torchvision
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_batch_norm_false_removes_batch_norm(name):
    model = models.build_model(name, (1, 28, 28), 10, batch_norm=False)
    assert count_batch_norm(model) == 0
    assert output_shape(model, torch.zeros(2, 1, 28, 28)) == (2, 10)


@requires_torchvision
def test_batch_norm_true_keeps_torchvision_layers():
    model = models.build_model("resnet18", (3, 32, 32), 10)
    assert count_batch_norm(model) == 20


@requires_torchvision
def test_batch_norm_false_without_norm_layer():
    message = (
        "Model 'shufflenet_v2_x0_5' cannot be built without batch norm, because its "
        "torchvision builder does not take a norm_layer argument. Pass "
        "batch_norm=True, or choose a model whose builder takes one, such as resnet50 "
        "or mobilenet_v2."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.torchvision_classifier("shufflenet_v2_x0_5", batch_norm=False)


@requires_torchvision
def test_batch_norm_false_checks_rebuilt_model(monkeypatch):
    # A builder that takes norm_layer but still adds batch norm must be rejected.
    def build_with_batch_norm(name, **kwargs):
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    monkeypatch.setattr(torchvision.models, "get_model", build_with_batch_norm)
    message = (
        "Model 'resnet18' cannot be built without batch norm, because its "
        "torchvision builder still adds batch norm layers when norm_layer returns "
        "nn.Identity. Pass batch_norm=True, or choose a model whose builder takes "
        "one, such as resnet50 or mobilenet_v2."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.torchvision_classifier("resnet18", batch_norm=False)


@requires_torchvision
def test_batch_norm_false_model_without_batch_norm():
    model = models.torchvision_classifier("squeezenet1_0", classes=3, batch_norm=False)
    assert count_batch_norm(model) == 0
    assert model.classifier[1].out_channels == 3


def test_torchvision_classifier_rejects_own_models():
    message = (
        "Model 'mlp' is not a torchvision model. Build it with "
        "build_model('mlp', ...) or mlp(...)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.torchvision_classifier("mlp")


@requires_torchvision
def test_torchvision_classifier_rejects_zero_classes():
    message = "Expected classes to be a positive integer, but got 0."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.torchvision_classifier("resnet18", classes=0)


def test_missing_torchvision_names_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    message = (
        "Model 'resnet50' needs torchvision, which is not installed. Install it "
        'with: pip install "singledir[vision]"'
    )
    with pytest.raises(ImportError, match=f"^{re.escape(message)}$"):
        models.build_model("resnet50", (3, 32, 32), 10)
    with pytest.raises(ImportError, match=f"^{re.escape(message)}$"):
        models.resnet50()
    assert models.build_model("mlp", (4,), 2, hidden=(3,)).out.out_features == 2


# load_weights


def small_mlp(hidden=(6,), batch_norm=False, seed=0):
    torch.manual_seed(seed)
    return models.mlp(4, hidden=hidden, classes=3, batch_norm=batch_norm)


def assert_same_state(model_a: nn.Module, model_b: nn.Module) -> None:
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0)


def test_load_weights_round_trip(tmp_path):
    source, target = small_mlp(seed=1), small_mlp(seed=2)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    models.load_weights(target, str(path))
    assert_same_state(source, target)


def test_load_weights_checkpoint_dict(tmp_path):
    source, target = small_mlp(seed=1), small_mlp(seed=2)
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    models.load_weights(target, path)
    assert_same_state(source, target)


def test_load_weights_missing_file(tmp_path):
    path = tmp_path / "absent.pt"
    message = (
        f"Weights file {str(path)!r} does not exist or is not a file. Save the "
        "weights with torch.save(model.state_dict(), PATH)."
    )
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(message)}$"):
        models.load_weights(small_mlp(), path)


def test_load_weights_whole_model_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(small_mlp(), path)
    with pytest.raises(Exception) as torch_error:
        torch.load(path, map_location="cpu", weights_only=True)
    first_line = str(torch_error.value).strip().splitlines()[0]
    message = (
        f"Weights file {str(path)!r} could not be read as tensors ({first_line}). "
        "Save the weights with torch.save(model.state_dict(), PATH), not the model."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.load_weights(small_mlp(), path)


def test_load_weights_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    message = (
        f"Weights file {str(path)!r} contains a list, not a state_dict. Save the "
        "weights with torch.save(model.state_dict(), PATH)."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        models.load_weights(small_mlp(), path)


def test_load_weights_dict_of_non_tensors(tmp_path):
    path = tmp_path / "config.pt"
    torch.save({"epoch": 3}, path)
    message = (
        f"Weights file {str(path)!r} contains a dict whose entry 'epoch' is a int, "
        "not a tensor, so it is not a state_dict. Save the weights with "
        "torch.save(model.state_dict(), PATH)."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        models.load_weights(small_mlp(), path)


def test_load_weights_shape_mismatch(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(small_mlp(hidden=(6,)).state_dict(), path)
    target = small_mlp(hidden=(5,), seed=2)
    before = small_mlp(hidden=(5,), seed=2)
    message = (
        f"Weights file {str(path)!r} does not match the model built with these "
        "options (a different --model, --width or --classes?). Shape mismatches: "
        "fc1.weight is (6, 4) in the file but (5, 4) in the model, fc1.bias is (6,) "
        "in the file but (5,) in the model, out.weight is (3, 6) in the file but "
        "(3, 5) in the model."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.load_weights(target, path)
    assert_same_state(target, before)


def test_load_weights_unexpected_keys(tmp_path):
    path = tmp_path / "deep.pt"
    torch.save(small_mlp(hidden=(6, 6)).state_dict(), path)
    message = (
        f"Weights file {str(path)!r} does not match the model built with these "
        "options (a different --model, --width or --classes?). Unexpected keys: "
        "fc2.weight, fc2.bias."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.load_weights(small_mlp(hidden=(6,)), path)


def test_load_weights_lists_five_missing_keys(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(small_mlp(hidden=(6, 6)).state_dict(), path)
    message = (
        f"Weights file {str(path)!r} does not match the model built with these "
        "options (a different --model, --width or --classes?). Missing keys: "
        "bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var, "
        "bn1.num_batches_tracked and 5 more."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.load_weights(small_mlp(hidden=(6, 6), batch_norm=True), path)


def test_load_weights_missing_and_unexpected(tmp_path):
    path = tmp_path / "renamed.pt"
    state = small_mlp().state_dict()
    state["head.weight"] = state.pop("out.weight")
    torch.save(state, path)
    message = (
        f"Weights file {str(path)!r} does not match the model built with these "
        "options (a different --model, --width or --classes?). Missing keys: "
        "out.weight. Unexpected keys: head.weight."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.load_weights(small_mlp(), path)


# default_layers


def assert_layers_resolve(model, names, example_input):
    found = find_layers(model, example_input, layers=names)
    assert [layer.name for layer in found] == names
    assert all(layer.calls == 1 for layer in found)
    assert all(len(layer.shape) == 4 for layer in found)


def test_default_layers_mlp():
    model = models.mlp(20, hidden=(8, 5, 4))
    assert models.default_layers(model) == ["relu1", "relu2", "relu3"]


def test_default_layers_mlp_with_batch_norm_and_dropout():
    model = models.mlp(20, hidden=(8, 5), batch_norm=True, dropout=0.1)
    assert models.default_layers(model) == ["relu1", "relu2"]


def test_default_layers_cnn11():
    model = models.cnn11(in_channels=1, width=0.125, image_size=8)
    assert models.default_layers(model) == ["relu9", "relu10", "relu11"]
    assert_layers_resolve(model, ["relu9", "relu10", "relu11"], torch.zeros(1, 1, 8, 8))


@requires_torchvision
def test_default_layers_resnet18(resnet18):
    names = models.default_layers(resnet18)
    assert names == ["layer3.1", "layer4.0", "layer4.1"]
    assert_layers_resolve(resnet18, names, torch.zeros(1, 3, 32, 32))


@requires_torchvision
def test_default_layers_resnet50(resnet50):
    names = models.default_layers(resnet50, torch.zeros(1, 3, 32, 32))
    assert names == ["layer4.0", "layer4.1", "layer4.2"]
    assert_layers_resolve(resnet50, names, torch.zeros(1, 3, 32, 32))


@requires_torchvision
def test_default_layers_resnet_not_shared_relu(resnet50):
    # The block's `relu` module runs three times per block, so it cannot be ablated.
    calls = find_layers(resnet50, torch.zeros(1, 3, 32, 32), layers=["layer4.2.relu"])
    assert calls[0].calls == 3


@requires_torchvision
def test_default_layers_vgg11_last_relus(vgg11):
    example = torch.zeros(1, 3, 32, 32)
    names = models.default_layers(vgg11, example)
    assert names == ["features.14", "features.17", "features.19"]
    assert all(isinstance(vgg11.get_submodule(name), nn.ReLU) for name in names)
    assert_layers_resolve(vgg11, names, example)


@requires_torchvision
def test_default_layers_mobilenet_v2(mobilenet_v2):
    example = torch.zeros(1, 3, 32, 32)
    names = models.default_layers(mobilenet_v2, example)
    assert names == ["features.17.conv.0.2", "features.17.conv.1.2", "features.18.2"]
    assert all(isinstance(mobilenet_v2.get_submodule(name), nn.ReLU6) for name in names)
    assert_layers_resolve(mobilenet_v2, names, example)


@requires_torchvision
@pytest.mark.parametrize("fixture", ["vgg11", "mobilenet_v2"])
def test_default_layers_leaves_model_unchanged(fixture, request):
    model = request.getfixturevalue(fixture)
    model.train()
    model.features[0].eval()
    modes = [module.training for module in model.modules()]
    hooks = forward_hook_counts(model)
    rng_state = torch.random.get_rng_state()
    models.default_layers(model, torch.zeros(1, 3, 32, 32))
    assert forward_hook_counts(model) == hooks
    assert [module.training for module in model.modules()] == modes
    assert torch.equal(torch.random.get_rng_state(), rng_state)


class SqueezeExcitationNet(nn.Module):
    """Three conv layers with ReLUs, then a channel gate built as in SE blocks."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.act3 = nn.ReLU()
        self.gate = nn.Sequential(
            OrderedDict(
                [
                    ("pool", nn.AdaptiveAvgPool2d(1)),
                    ("reduce", nn.Conv2d(4, 2, 1)),
                    ("act", nn.ReLU()),
                    ("expand", nn.Conv2d(2, 4, 1)),
                    ("scale", nn.Sigmoid()),
                ]
            )
        )
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        x = self.act3(self.conv3(x))
        x = x * self.gate(x)
        return self.head(x.mean(dim=(2, 3)))


def test_default_layers_skips_channel_gates():
    names = models.default_layers(SqueezeExcitationNet(), torch.zeros(1, 1, 6, 6))
    assert names == ["act1", "act2", "act3"]


class SharedReluNet(nn.Module):
    """Three conv layers with their own ReLUs, then one ReLU module run twice."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(2, 2, 3, padding=1) for _ in range(5))
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(3))
        self.shared = nn.ReLU()
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        for conv, act in zip(self.convs[:3], self.acts):
            x = act(conv(x))
        x = self.shared(self.convs[4](self.shared(self.convs[3](x))))
        return self.head(x.mean(dim=(2, 3)))


def test_default_layers_skips_reused_activation():
    names = models.default_layers(SharedReluNet(), torch.zeros(1, 2, 4, 4))
    assert names == ["acts.0", "acts.1", "acts.2"]


class ChannelsLastNet(nn.Module):
    """Conv layers with ReLUs, then GELUs on channels-last tensors."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.act3 = nn.ReLU()
        self.mlp1 = nn.Linear(4, 8)
        self.gelu1 = nn.GELU()
        self.mlp2 = nn.Linear(8, 4)
        self.gelu2 = nn.GELU()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.act3(self.conv3(self.act2(self.conv2(self.act1(self.conv1(x))))))
        x = x.permute(0, 2, 3, 1)
        x = self.gelu2(self.mlp2(self.gelu1(self.mlp1(x))))
        return self.head(x.mean(dim=(1, 2)))


def test_default_layers_skips_channels_last():
    names = models.default_layers(ChannelsLastNet(), torch.zeros(1, 1, 6, 6))
    assert names == ["act1", "act2", "act3"]


class Block(nn.Module):
    def __init__(self, channels_in, channels_out):
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class FunctionalReluNet(nn.Module):
    """Blocks that apply ReLU as a function, so no activation module runs."""

    def __init__(self, blocks=4):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.blocks = nn.ModuleList(Block(3, 3) for _ in range(blocks))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def test_default_layers_blocks_without_activation_modules():
    model = FunctionalReluNet()
    example = torch.zeros(1, 1, 5, 5)
    names = models.default_layers(model, example)
    assert names == ["blocks.1", "blocks.2", "blocks.3"]
    assert_layers_resolve(model, names, example)


def test_default_layers_no_rule_applies():
    model = FunctionalReluNet(blocks=2)
    message = (
        "Found no default layers to ablate in this FunctionalReluNet: fewer than 3 "
        "activation modules or blocks output a (batch, channels, height, width) "
        "feature map once per forward pass. Pass the layers to ablate explicitly "
        "(--layers, or layers=[...] in Python), and unit_dim if their units do not "
        "lie along dimension 1. The last modules that ran once are: stem, "
        "blocks.0.conv, blocks.0, blocks.1.conv, blocks.1, head."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.default_layers(model, torch.zeros(1, 1, 5, 5))


def test_default_layers_needs_example_input():
    message = (
        "default_layers needs example_input to choose the layers of a "
        "FunctionalReluNet, because it is not an mlp, cnn11 or torchvision ResNet. "
        "Pass one batch of inputs, such as torch.zeros(1, 3, 224, 224)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.default_layers(FunctionalReluNet())


class FailingNet(FunctionalReluNet):
    def forward(self, x):
        super().forward(x)
        raise RuntimeError("forward failed")


def test_default_layers_removes_hooks_on_error():
    model = FailingNet()
    model.train()
    handle = model.stem.register_forward_hook(lambda module, inputs, output: None)
    hooks = forward_hook_counts(model)
    with pytest.raises(RuntimeError, match="^forward failed$"):
        models.default_layers(model, torch.zeros(1, 1, 5, 5))
    assert forward_hook_counts(model) == hooks
    assert all(module.training for module in model.modules())
    handle.remove()


# default_metric


@pytest.mark.parametrize(
    ("name", "metric"),
    [
        ("mlp", "accuracy"),
        ("cnn11", "accuracy"),
        pytest.param("resnet50", "top5", marks=requires_torchvision),
        pytest.param("vgg11", "top5", marks=requires_torchvision),
    ],
)
def test_default_metric(name, metric):
    assert models.default_metric(name) == metric


@requires_torchvision
def test_default_metric_unknown_name():
    message = (
        "Unknown model 'cnn12'. Pass one of mlp, cnn11, resnet50, or the name of any "
        "torchvision classification model, such as resnet18 or vgg11."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        models.default_metric("cnn12")
