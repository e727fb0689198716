"""SimSiam / SiamKD loss values and the kNN monitor."""

import pytest
import torch

from sdr_edge.ssl import SimSiamHeads, knn_accuracy, negative_cosine, siamkd_loss, simsiam_loss


def test_identical_predictions_and_targets_give_minus_one():
    p = torch.randn(8, 16)
    assert simsiam_loss(p, p, p, p).item() == pytest.approx(-1.0, abs=1e-6)
    assert negative_cosine(p, 3.0 * p).item() == pytest.approx(-1.0, abs=1e-6)  # scale-free


def test_orthogonal_predictions_give_zero_and_opposite_give_plus_one():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[0.0, 5.0], [-1.0, 0.0]])
    assert simsiam_loss(p, p, z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert negative_cosine(p, -p).item() == pytest.approx(1.0, abs=1e-6)


def test_stop_gradient_leaves_targets_without_gradient():
    p1, p2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    z1, z2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    simsiam_loss(p1, p2, z1, z2).backward()
    assert p1.grad is not None and p1.grad.abs().sum() > 0
    assert p2.grad is not None and p2.grad.abs().sum() > 0
    assert z1.grad is None and z2.grad is None


def test_siamkd_interpolates_between_simsiam_and_distillation():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2, t1, t2 = (torch.randn(6, 10, generator=g) for _ in range(6))
    plain = simsiam_loss(p1, p2, z1, z2)
    distill = 0.5 * (negative_cosine(p1, t2) + negative_cosine(p2, t1))
    assert torch.equal(siamkd_loss(p1, p2, z1, z2, t1, t2, 0.0), plain)
    assert siamkd_loss(p1, p2, z1, z2, t1, t2, 1.0).item() == pytest.approx(distill.item())
    mid = siamkd_loss(p1, p2, z1, z2, t1, t2, 0.25).item()
    assert mid == pytest.approx(0.75 * plain.item() + 0.25 * distill.item(), abs=1e-6)
    with pytest.raises(ValueError, match="kd_weight"):
        siamkd_loss(p1, p2, z1, z2, t1, t2, 1.5)


def test_siamkd_pulls_predictions_toward_the_teacher_of_the_other_view():
    t1, t2 = torch.randn(4, 8), torch.randn(4, 8)
    p1, p2 = t2.clone().requires_grad_(), t1.clone().requires_grad_()  # already equal to targets
    z = torch.randn(4, 8)
    assert siamkd_loss(p1, p2, z, z, t1, t2, 1.0).item() == pytest.approx(-1.0, abs=1e-6)


def test_heads_shapes():
    heads = SimSiamHeads(32, proj_dim=24, pred_hidden=6)
    z = heads.projector(torch.randn(5, 32))
    assert z.shape == (5, 24) and heads.predictor(z).shape == (5, 24)


def test_knn_accuracy_separates_clusters_and_is_chance_on_noise():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 5
    labels = torch.arange(3).repeat_interleave(40)
    feats = centers[labels] + torch.randn(120, 16, generator=g) * 0.3
    assert knn_accuracy(feats[::2], labels[::2], feats[1::2], labels[1::2], k=5) == 1.0
    noise = torch.randn(120, 16, generator=g)
    assert knn_accuracy(noise[::2], labels[::2], noise[1::2], labels[1::2], k=5) < 0.7
