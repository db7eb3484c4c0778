"""U-Net: shapes for any size, parameter counts at full width, build_model validation, channels_last."""

from __future__ import annotations

import pytest
import torch

from dlseg.model import ModelConfig, UNet, arch_dict, build_model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("bilinear, expected", [(False, 31_037_698), (True, 17_263_042)])
def test_full_width_parameter_count_matches_pytorch_unet(bilinear, expected):
    # Pytorch-UNet (3 input channels, 2 classes): 31.0 M with transposed convs, 17.3 M with bilinear upsampling.
    model = build_model({"name": "unet", "in_channels": 3, "num_classes": 2, "base_width": 64, "depth": 4,
                         "bilinear": bilinear})
    assert n_params(model) == expected


def test_parameter_count_formula_for_small_widths():
    # Doubling the width multiplies conv weights by ~4: a cheap check that widths follow base * 2**level.
    small, double = n_params(UNet(1, 1, 8, 3)), n_params(UNet(1, 1, 16, 3))
    assert 3.8 < double / small < 4.0


@pytest.mark.parametrize("bilinear", [True, False])
@pytest.mark.parametrize("size", [(16, 16), (37, 53), (64, 48), (17, 100)])
def test_output_has_input_size_and_num_classes(size, bilinear):
    model = UNet(2, 3, base_width=4, depth=4, bilinear=bilinear).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 2, *size))
    assert out.shape == (2, 3, *size)
    assert torch.isfinite(out).all()


def test_too_small_input_is_a_clear_error():
    model = UNet(1, 1, base_width=4, depth=4)
    with pytest.raises(ValueError, match="at least 16x16"):
        model(torch.randn(1, 1, 15, 32))


def test_channels_last_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    model = UNet(1, 2, base_width=4, depth=3).eval()
    x = torch.randn(2, 1, 40, 40)
    ref = model(x)
    ref.sum().backward()
    ref_grad = model.inc.double_conv[0].weight.grad.clone()
    model.zero_grad()
    model = model.to(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last))
    out.sum().backward()
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.inc.double_conv[0].weight.grad, ref_grad, rtol=1e-3, atol=1e-4)


def test_arch_dict_round_trips_through_build_model():
    cfg = ModelConfig(base_width=8, depth=3, bilinear=False, channels_last=True)
    arch = arch_dict(cfg, in_channels=3, num_classes=1)
    assert arch == {"name": "unet", "in_channels": 3, "num_classes": 1, "base_width": 8, "depth": 3,
                    "bilinear": False}
    model = build_model(arch)
    assert isinstance(model, UNet)
    assert model.outc.conv.out_channels == 1 and model.inc.double_conv[0].in_channels == 3
    assert len(model.downs) == 3
    assert isinstance(model.ups[0].up, torch.nn.ConvTranspose2d)


def test_same_arch_gives_loadable_state_dict():
    arch = {"name": "unet", "in_channels": 1, "num_classes": 5, "base_width": 4, "depth": 2, "bilinear": True}
    a, b = build_model(arch).eval(), build_model(dict(arch)).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert not torch.equal(a(x), b(x))                   # two random initialisations
        b.load_state_dict(a.state_dict(), strict=True)
        assert torch.equal(a(x), b(x))                       # the state dict carries everything the output needs


@pytest.mark.parametrize("change, message", [
    ({"name": "resnet"}, "arch.name"),
    ({"depth": 0}, "arch.depth"),
    ({"depth": 2.5}, "arch.depth"),
    ({"base_width": True}, "arch.base_width"),
    ({"num_classes": -1}, "arch.num_classes"),
    ({"in_channels": "1"}, "arch.in_channels"),
    ({"bilinear": "yes"}, "arch.bilinear"),
    ({"dropout": 0.1}, "unknown key"),
])
def test_bad_arch_values_are_value_errors_naming_the_key(change, message):
    arch = {"name": "unet", "in_channels": 1, "num_classes": 1, "base_width": 4, "depth": 2, "bilinear": True}
    with pytest.raises(ValueError, match=message):
        build_model({**arch, **change})


def test_missing_arch_key_is_named():
    with pytest.raises(ValueError, match="missing key.*depth"):
        build_model({"name": "unet", "in_channels": 1, "num_classes": 1, "base_width": 4, "bilinear": True})
    with pytest.raises(ValueError, match="mapping"):
        build_model(["unet"])
