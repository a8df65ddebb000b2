"""R2U-Net (DESIGN.md, Method item 3): parameter counts of the paper, shapes, shared recurrent conv, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from LumbarBMDLib.r2unet import R2UNet, RecurrentBlock, RRCNNBlock, count_parameters, r2unet_from_width


@pytest.mark.parametrize(
    ("features", "expected"),
    [((64, 128, 256, 512, 1024), 39_091_525), ((16, 32, 64, 128, 256), 2_447_701)],
)
def test_parameter_counts_match_the_paper(features, expected):
    net = R2UNet(in_channels=1, out_channels=5, features=features)
    assert count_parameters(net) == expected


def test_from_width_builds_doubling_widths():
    net = r2unet_from_width(16)
    assert net.features == (16, 32, 64, 128, 256)
    assert count_parameters(net) == 2_447_701
    assert R2UNet.from_width(4, in_channels=3, out_channels=2).features == (4, 8, 16, 32, 64)


def test_default_constructor_is_the_paper_network():
    net = R2UNet()
    assert (net.in_channels, net.out_channels, net.features, net.t) == (1, 5, (64, 128, 256, 512, 1024), 2)


def test_output_shape():
    torch.manual_seed(0)
    net = r2unet_from_width(4).eval()
    with torch.inference_mode():
        out = net(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 5, 64, 64)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_non_square_input_divisible_by_16():
    net = r2unet_from_width(4, out_channels=3).eval()
    with torch.inference_mode():
        assert net(torch.rand(1, 1, 32, 48)).shape == (1, 3, 32, 48)


@pytest.mark.parametrize("shape", [(1, 1, 60, 60), (1, 1, 64, 56), (1, 1, 8, 64)])
def test_size_not_divisible_by_16_raises(shape):
    net = r2unet_from_width(4)
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.rand(*shape))


def test_wrong_channels_or_rank_raise():
    net = r2unet_from_width(4)
    with pytest.raises(ValueError, match="expects input"):
        net(torch.rand(1, 2, 64, 64))
    with pytest.raises(ValueError, match="expects input"):
        net(torch.rand(1, 64, 64))


def test_features_must_have_five_widths():
    with pytest.raises(ValueError, match="5 positive widths"):
        R2UNet(features=(4, 8, 16, 32))


def test_recurrent_block_shares_one_conv():
    block = RecurrentBlock(8, t=2)
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 1 and len(bns) == 1
    conv_params = 8 * 8 * 3 * 3 + 8  # weights + bias
    bn_params = 2 * 8  # affine weight + bias
    assert count_parameters(block) == conv_params + bn_params
    # the parameter count does not depend on t: the steps reuse the same weights
    assert count_parameters(RecurrentBlock(8, t=5)) == count_parameters(block)


def test_recurrent_block_applies_f_t_plus_one_times():
    torch.manual_seed(1)
    block = RecurrentBlock(3, t=2).eval()
    x = torch.rand(1, 3, 8, 8)
    with torch.inference_mode():

        def f(inp, step):  # the shared conv and BN affine, with the step's own running statistics
            bn = block.bn
            mean, var = getattr(bn, f"running_mean_{step}"), getattr(bn, f"running_var_{step}")
            return torch.relu(
                (block.conv(inp) - mean[:, None, None])
                / torch.sqrt(var[:, None, None] + bn.eps)
                * bn.weight[:, None, None]
                + bn.bias[:, None, None]
            )

        expected = f(x, 0)
        for step in (1, 2):
            expected = f(x + expected, step)
        torch.testing.assert_close(block(x), expected)


def test_recurrent_block_keeps_running_statistics_per_step():
    """The steps see different inputs (x, then x + x1): each keeps its own running mean/variance."""
    torch.manual_seed(2)
    block = RecurrentBlock(4, t=2).train()
    with torch.no_grad():
        block(torch.rand(8, 4, 16, 16) * 5.0)
    means = [getattr(block.bn, f"running_mean_{i}") for i in range(3)]
    assert not torch.allclose(means[0], means[1]) and not torch.allclose(means[1], means[2])
    assert count_parameters(block) == 4 * 4 * 9 + 4 + 2 * 4  # buffers are not parameters


def test_rrcnn_block_is_residual_around_two_recurrent_blocks():
    torch.manual_seed(2)
    block = RRCNNBlock(2, 4, t=2).eval()
    assert sum(isinstance(m, RecurrentBlock) for m in block.modules()) == 2
    x = torch.rand(1, 2, 8, 8)
    with torch.inference_mode():
        y = block.conv1x1(x)
        assert torch.equal(block(x), y + block.rcnn(y))


def test_same_seed_same_output_in_eval_mode():
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    outs = []
    for _ in range(2):
        torch.manual_seed(42)
        net = r2unet_from_width(4).eval()
        with torch.inference_mode():
            outs.append(net(x))
    assert torch.equal(outs[0], outs[1])
    with torch.inference_mode():
        assert torch.equal(net(x), outs[1])  # repeated calls agree too


def test_gradients_reach_every_parameter():
    torch.manual_seed(4)
    net = r2unet_from_width(4).train()
    x = torch.rand(2, 1, 32, 32)
    target = torch.randint(0, 5, (2, 32, 32))
    loss = nn.functional.cross_entropy(net(x), target)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
