import pytest
import torch

from sdr_edge.models import Backbone, BackboneConfig, SDRnet
from sdr_edge.models.sdrnet import RoutedStage


def _trained_like(net: SDRnet) -> SDRnet:
    for r in range(net.levels):
        net.split_level(r)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1, generator=g)
                m.running_var.uniform_(0.8, 1.2, generator=g)
    return net.eval()


def test_extract_matches_routed_forward():
    net = _trained_like(SDRnet(BackboneConfig.preset("small", in_channels=1), (4, 4, 4, 4)))
    x = torch.randn(6, 1, 16, 16)
    for route in [(0, 0, 0, 0), (3, 1, 2, 0), (1, 3, 3, 2)]:
        sub = net.extract(route).eval()
        assert isinstance(sub, Backbone)
        assert torch.allclose(sub(x), net(x, route), atol=1e-6)


def test_mixed_batch_equals_per_image_subnets():
    net = _trained_like(SDRnet(BackboneConfig.preset("small", in_channels=1), (4, 4, 4, 4)))
    x = torch.randn(10, 1, 16, 16)
    codes = torch.randint(0, 4, (10, 4), generator=torch.Generator().manual_seed(1))
    mixed = net(x, codes)
    single = torch.cat([net.extract(c.tolist()).eval()(x[i : i + 1]) for i, c in enumerate(codes)])
    assert torch.allclose(mixed, single, atol=1e-5)


def test_every_image_passes_through_exactly_its_experts():
    net = _trained_like(SDRnet(BackboneConfig.preset("small", in_channels=1), (4, 4, 4, 4)))
    seen: dict[tuple[int, int], int] = {}
    for s, stage in enumerate(net.stages):
        if isinstance(stage, RoutedStage):
            for b, expert in enumerate(stage.experts):
                expert.register_forward_hook(
                    lambda m, i, o, key=(s, b): seen.__setitem__(key, seen.get(key, 0) + i[0].shape[0])
                )
    x = torch.randn(32, 1, 16, 16)
    codes = torch.randint(0, 4, (32, 4), generator=torch.Generator().manual_seed(2))
    net(x, codes)
    for r, s in enumerate(net.level_stages):
        for b in range(4):
            assert seen.get((s, b), 0) == int((codes[:, r] == b).sum())


def test_inactive_levels_route_to_expert_zero_and_split_copies_weights():
    net = SDRnet(BackboneConfig.preset("small", in_channels=1), (2, 3))
    x = torch.randn(4, 1, 16, 16)
    net.eval()
    assert torch.allclose(net(x, (1, 2)), net(x, (0, 0)))
    stage = net.stages[net.level_stages[0]]
    with torch.no_grad():
        next(stage.experts[0].parameters()).add_(1.0)
    net.split_level(0)
    for expert in stage.experts[1:]:
        for a, b in zip(expert.parameters(), stage.experts[0].parameters(), strict=True):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="levels activate in order"):
        net.split_level(2)


def test_bad_codes_are_refused():
    net = SDRnet(BackboneConfig.preset("small", in_channels=1), (4, 4))
    with pytest.raises(ValueError, match="out of range"):
        net(torch.randn(2, 1, 16, 16), torch.tensor([[0, 4], [0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(2, 1, 16, 16), torch.tensor([[0, 1, 2]]))


def test_presets_build_and_run():
    for name, size in [("resnet18", 64), ("resnet50", 64)]:
        net = Backbone(BackboneConfig.preset(name, in_channels=3)).eval()
        assert net(torch.randn(1, 3, size, size)).shape == (1, net.feature_dim)


@pytest.mark.parametrize("preset", ["small", "resnet50"])
def test_zero_gamma_is_opt_in_and_zeroes_the_last_bn_of_every_residual_branch(preset):
    """Default init: every BN gamma 1. zero_residual_gammas: each block starts as its shortcut;
    every other BN (stem, shortcut) keeps 1."""
    from sdr_edge.models.resnet import BasicBlock, Bottleneck, zero_residual_gammas

    torch.manual_seed(0)
    nets = [Backbone(BackboneConfig.preset(preset, in_channels=3)),
            SDRnet(BackboneConfig.preset(preset, in_channels=3), (2, 2))]
    for net in nets:
        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert all(torch.equal(bn.weight, torch.ones_like(bn.weight)) for bn in bns)
        zero_residual_gammas(net)
        blocks = [m for m in net.modules() if isinstance(m, BasicBlock | Bottleneck)]
        assert blocks
        last = {id(b.bn3 if isinstance(b, Bottleneck) else b.bn2) for b in blocks}
        assert len(bns) > len(last)  # the stem's and the shortcuts' BNs keep gamma 1
        for bn in bns:
            assert torch.equal(bn.weight, torch.full_like(bn.weight, 0.0 if id(bn) in last else 1.0))
            assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_tree_codes_give_every_tree_node_its_own_expert():
    """Tree codes: the level-2 expert is the node (parent, child), so two routes that share the
    child digit under different parents extract different level-2 experts, and a mixed batch
    still equals each image's own sub-net."""
    cfg = BackboneConfig.preset("small", in_channels=1)
    net = _trained_like(SDRnet(cfg, (4, 4), codes="tree"))
    assert net.expert_counts == (4, 16) and net.num_subnets == 16
    deep, shallow = (net.stages[s] for s in net.level_stages)
    assert len(deep.experts) == 4 and len(shallow.experts) == 16
    a, b = net.extract((0, 1)), net.extract((2, 1))
    s = net.level_stages[1]
    for got, node in ((a, 0 * 4 + 1), (b, 2 * 4 + 1)):
        for p, q in zip(got.stages[s].parameters(), shallow.experts[node].parameters(), strict=True):
            assert torch.equal(p, q)
    x = torch.randn(12, 1, 16, 16)
    codes = torch.randint(0, 4, (12, 2), generator=torch.Generator().manual_seed(3))
    single = torch.cat([net.extract(c.tolist()).eval()(x[i:i + 1]) for i, c in enumerate(codes)])
    assert torch.allclose(net(x, codes), single, atol=1e-5)
    again = SDRnet.from_arch_dict(net.arch_dict())
    assert again.codes == "tree" and again.expert_counts == (4, 16)
    assert "codes" not in SDRnet(cfg, (4, 4)).arch_dict()  # residual runs read as before
    with pytest.raises(ValueError, match="codes must be one of"):
        SDRnet(cfg, (4, 4), codes="flat")


def test_tree_codes_route_inactive_levels_to_expert_zero():
    net = SDRnet(BackboneConfig.preset("small", in_channels=1), (2, 3), codes="tree").eval()
    net.split_level(0)
    codes = torch.tensor([[1, 2], [0, 1]])
    assert net.expert_indices(codes).tolist() == [[1, 0], [0, 0]]
    net.split_level(1)
    assert net.expert_indices(codes).tolist() == [[1, 5], [0, 1]]
