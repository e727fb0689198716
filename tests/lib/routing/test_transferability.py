"""Re-ranking scores: RankMe tracks rank, LogME, kNN and the probe prefer features that carry the labels."""

from __future__ import annotations

import numpy as np
import pytest

from sdr_edge.routing.transferability import (
    TransferabilityError,
    consensus_labels,
    consensus_logme,
    knn_loo_accuracy,
    logme,
    probe_cv_accuracy,
    rankme,
    rerank,
    score_candidates,
    score_features,
)


def test_rankme_counts_equal_directions() -> None:
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(32, 32)))[0]
    for rank in (1, 4, 16):
        coeffs = np.linalg.qr(rng.normal(size=(200, rank)))[0] * 10.0  # orthonormal columns
        features = coeffs @ basis[:rank]
        assert rankme(features) == pytest.approx(rank, rel=1e-3)


def test_logme_prefers_features_that_carry_the_labels() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=300)
    centres = rng.normal(size=(3, 16)) * 3
    useful = centres[labels] + rng.normal(size=(300, 16))
    noise = rng.normal(size=(300, 16))
    assert logme(useful, labels) > logme(noise, labels) + 0.1


def test_logme_matches_brute_force_evidence() -> None:
    """The SVD form equals the evidence computed with dense matrices at the same alpha, beta."""
    rng = np.random.default_rng(2)
    f = rng.normal(size=(40, 6))
    y = rng.integers(0, 2, size=40)
    score = logme(f, y)
    # Brute force: maximise the evidence of each class column over a log grid of alpha, beta.
    def evidence(a: float, b: float, t: np.ndarray) -> float:
        n, d = f.shape
        cov = np.eye(n) / b + f @ f.T / a
        sign, logdet = np.linalg.slogdet(cov)
        return float(-0.5 * (n * np.log(2 * np.pi) + logdet + t @ np.linalg.solve(cov, t))) / n
    grid = np.exp(np.linspace(-6, 6, 61))
    best = [max(evidence(a, b, (y == c).astype(float)) for a in grid for b in grid) for c in (0, 1)]
    assert score == pytest.approx(np.mean(best), abs=0.02)


def test_consensus_prefers_the_candidate_that_carries_the_shared_clusters() -> None:
    """Label-free: three candidates see the same images, whose latent groups two of them carry
    (one clearly, one noisily) and the third does not. The consensus score orders them by how
    well they carry the groups; RankMe, which rewards spread, prefers the structureless one."""
    rng = np.random.default_rng(5)
    groups = rng.integers(0, 6, size=400)  # never shown to the scores
    centres = rng.normal(size=(6, 16)) * 3
    clear = centres[groups] + rng.normal(size=(400, 16))
    noisy = centres[groups] + 3.0 * rng.normal(size=(400, 16))
    spread = rng.normal(size=(400, 16))
    labels = consensus_labels([clear, noisy, spread], clusters=6)
    assert np.mean([np.bincount(labels[groups == g]).max() for g in range(6)]) > 0.9 * 400 / 6
    scores = consensus_logme([clear, noisy, spread], clusters=6, seeds=1)
    assert scores[0] > scores[1] > scores[2]
    # the default: the mean over 9 clusterings (16, 32, 64 clusters x 3 seeds)
    per = [consensus_logme([clear, noisy, spread], k, seeds=1) for k in (16, 32, 64)]
    def standardised(f):
        return (f - f.mean(axis=0)) / (f.std(axis=0) + 1e-6)

    seeded = [[logme(standardised(f), consensus_labels([clear, noisy, spread], k, seed))
               for f in (clear, noisy, spread)] for k in (16, 32, 64) for seed in range(3)]
    assert per[0] == pytest.approx(seeded[0], rel=1e-6)  # LogME of standardised features
    default = score_candidates("consensus", [clear, noisy, spread])
    assert default == pytest.approx(np.mean(seeded, axis=0), rel=1e-6)
    assert default[0] > default[1] > default[2]
    order = rerank([(0,), (1,), (2,)], {(0,): clear, (1,): noisy, (2,): spread}.__getitem__,
                   "consensus")
    assert [r for r, _ in order] == [(0,), (1,), (2,)]
    assert rankme(spread) > rankme(clear)  # what the consensus score corrects
    # cluster counts above the image count are dropped; none left is refused
    assert consensus_logme([clear[:40], noisy[:40]]) == pytest.approx(
        consensus_logme([clear[:40], noisy[:40]], (16, 32)))
    with pytest.raises(TransferabilityError, match="more than 16 local images, got 12"):
        consensus_logme([clear[:12], noisy[:12]])
    with pytest.raises(TransferabilityError, match="all of the same N images"):
        consensus_logme([clear, noisy[:100]])
    with pytest.raises(TransferabilityError, match="use score_candidates"):
        score_features("consensus", clear)


def test_knn_loo_and_rerank_order() -> None:
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(2), 50)
    separated = np.concatenate([rng.normal(5, 1, (50, 4)), rng.normal(-5, 1, (50, 4))])
    mixed = rng.normal(size=(100, 4))
    assert knn_loo_accuracy(separated, labels) == 1.0
    assert knn_loo_accuracy(mixed, labels) < 0.75
    feats = {(0, 0): mixed, (1, 1): separated}
    order = rerank([(0, 0), (1, 1)], feats.__getitem__, "knn", labels)
    assert [r for r, _ in order] == [(1, 1), (0, 0)]
    with pytest.raises(ValueError, match="needs labels"):
        rerank([(0, 0)], feats.__getitem__, "logme")


def test_probe_cv_ranks_by_held_out_accuracy_and_refuses_too_few_labels() -> None:
    """The cross-validated probe scores held-out folds: separable features near 1, features
    that carry no label near chance (a probe scored on its own training images would not be)."""
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(4), 10)
    centres = rng.normal(size=(4, 32)) * 4
    useful = centres[labels] + rng.normal(size=(40, 32))
    noise = rng.normal(size=(40, 32))
    assert probe_cv_accuracy(useful, labels) >= 0.95
    assert probe_cv_accuracy(noise, labels) < 0.5  # 32 dims > 10 per class: memorisable
    assert score_features("probe", useful, labels) == probe_cv_accuracy(useful, labels)
    # 5 folds need 5 images per class; with 3 the folds drop to 3, with 1 it is refused
    three = np.concatenate([np.flatnonzero(labels == c)[:3] for c in range(4)])
    assert probe_cv_accuracy(useful[three], labels[three]) >= 0.9
    one = three[2:]  # class 0 keeps a single image
    with pytest.raises(TransferabilityError, match="at least two labelled images each"):
        probe_cv_accuracy(useful[one], labels[one])
    with pytest.raises(TransferabilityError, match="needs labels"):
        score_features("probe", useful)


def test_rerank_eval_on_a_tiny_run(tmp_path) -> None:
    """Every option picks one of the top-M signature candidates; costs and regrets add up."""
    from helpers_rundir import build_tiny_run

    from sdr_edge.routing.rerank_eval import OPTIONS, evaluate_rerank

    run = build_tiny_run(tmp_path / "run")
    res = evaluate_rerank(run, "builtin:digits", top_m=4, random_routes=3, labels_per_class=5,
                          image_limit=300, seed=0)
    tops = [c["route"] for c in res["candidates"]]
    assert len(tops) == 4 and res["random_routes"] == 3
    assert res["labelled_images"] == 50
    assert res["options"]["signature"]["route"] == tops[0]
    for name in OPTIONS:
        row = res["options"][name]
        assert row["route"] in tops
        assert row["regret_points"] >= 0
        assert row["minus_random_points"] == pytest.approx(
            100 * (row["probe"] - res["random_mean_probe"]))
    sig_bytes = res["options"]["signature"]["bytes"]
    assert sig_bytes > 1000 and res["options"]["rankme"]["bytes"] == 4 * sig_bytes
    # the re-ranked pick is the candidate with the highest score of its method
    for method in ("knn", "probe"):
        best = max(c[method] for c in res["candidates"])
        picked = next(c for c in res["candidates"]
                      if c["route"] == res["options"][method]["route"])
        assert picked[method] == best
