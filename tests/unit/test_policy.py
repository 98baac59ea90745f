from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.policy import Chooser, Posterior


def setup(k: int = 4, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray, Posterior]:
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(k, d))
    w = rng.normal(size=d)
    post = Posterior.prior(w, 0.0, prior_std=0.5)
    scores = 1 / (1 + np.exp(-(feats @ w)))
    return feats, scores, post


def test_greedy_picks_the_best_mean_score_with_propensity_one() -> None:
    feats, scores, post = setup()
    c = Chooser("greedy").choose(feats, scores, post, np.random.default_rng(1))
    assert c.index == int(np.argmax(scores)) and c.propensity == 1.0


def test_ineligible_candidates_are_never_chosen() -> None:
    feats, scores, post = setup()
    ok = np.ones(4, bool)
    ok[int(np.argmax(scores))] = False
    for policy in ("greedy", "thompson", "random", "epsilon_greedy"):
        for s in range(20):
            c = Chooser(policy).choose(feats, scores, post, np.random.default_rng(s), eligible=ok)
            assert ok[c.index], policy


def test_random_and_epsilon_greedy_propensities_are_exact() -> None:
    feats, scores, post = setup()
    c = Chooser("random").choose(feats, scores, post, np.random.default_rng(2))
    assert c.propensity == pytest.approx(0.25)
    best = int(np.argmax(scores))
    for s in range(50):
        c = Chooser("epsilon_greedy", epsilon=0.2).choose(feats, scores, post, np.random.default_rng(s))
        assert c.propensity == pytest.approx(0.8 + 0.05 if c.index == best else 0.05)


def test_thompson_propensities_match_empirical_choice_frequencies() -> None:
    feats, scores, post = setup(seed=3)
    chooser = Chooser("thompson", mc_draws=400)
    picks = np.zeros(4)
    props: dict[int, list[float]] = {i: [] for i in range(4)}
    for s in range(3000):
        c = chooser.choose(feats, scores, post, np.random.default_rng(s))
        picks[c.index] += 1
        props[c.index].append(c.propensity)
    freq = picks / picks.sum()
    assert (freq > 0).sum() >= 2  # it explores
    for i in range(4):
        if picks[i] > 100:
            assert np.mean(props[i]) == pytest.approx(freq[i], abs=0.04)


def test_more_evidence_means_less_exploration() -> None:
    feats, scores, post = setup(seed=4)
    chooser = Chooser("thompson")
    best = int(np.argmax(scores))

    def share_of_best(p: Posterior) -> float:
        return np.mean([chooser.choose(feats, scores, p, np.random.default_rng(s)).index == best
                        for s in range(500)])

    before = share_of_best(post)
    sure = Posterior(post.mean.copy(), post.precision.copy())
    sure.observe(np.repeat(feats, 500, axis=0), np.full(2000, 0.5))
    assert share_of_best(sure) > before
    assert (sure.precision > post.precision).all()


def test_posterior_round_trips_through_safetensors(tmp_path: Path) -> None:
    _f, _s, post = setup()
    post.save(tmp_path)
    again = Posterior.load(tmp_path)
    assert again is not None
    np.testing.assert_array_equal(again.mean, post.mean)
    np.testing.assert_array_equal(again.precision, post.precision)
    assert Posterior.load(tmp_path / "nowhere") is None


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        Chooser("psychic")


# -- the shopper's style response (a second posterior, per user and style)


def test_style_response_posterior_is_observed_over_expected_shrunk_to_one() -> None:
    from core.styles import StyleResponse

    r = StyleResponse.empty()
    for i in range(100):  # 100 impressions of social proof at predicted CTR 0.1: 30 clicks, 3x expected
        r.observe("social_proof", 0.1, i < 30)
    shape, rate = r.posterior("social_proof", strength=3.0)
    assert (shape, rate) == pytest.approx((33.0, 13.0))
    mean_log = r.log_factors(["social_proof", "urgency"], 3.0)[0]
    assert mean_log[0] == pytest.approx(np.log(33.0 / 13.0), abs=0.03)  # ~ log(observed / expected), shrunk
    assert mean_log[1] == pytest.approx(np.log(1.0) - 1 / 6 - 1 / 108, abs=1e-9)  # prior: E[log r], r ~ Gamma(3, 3)
    draws = r.log_factors(["social_proof", "urgency"], 3.0, np.random.default_rng(0), draws=4000)
    assert draws.shape == (4000, 2)
    assert draws[:, 0].mean() == pytest.approx(mean_log[0], abs=0.02)
    assert draws[:, 0].std() < draws[:, 1].std()  # more evidence, narrower


def test_style_offsets_steer_the_choice_and_zero_offsets_change_nothing() -> None:
    feats, scores, post = setup(seed=5)
    chooser = Chooser("thompson", mc_draws=50)
    zero = np.zeros((51, 4))
    for s in range(30):  # zero offsets: the same choice as without, same propensity
        a = chooser.choose(feats, scores, post, np.random.default_rng(s))
        b = chooser.choose(feats, scores, post, np.random.default_rng(s), offsets=zero)
        assert (a.index, a.propensity) == (b.index, b.propensity)
    worst = int(np.argmin(scores))
    boost = np.zeros((51, 4))
    boost[:, worst] = 20.0  # this shopper responds to that candidate's style far above the head's guess
    for s in range(30):
        c = chooser.choose(feats, scores, post, np.random.default_rng(s), offsets=boost)
        assert c.index == worst and c.propensity == pytest.approx(1.0)
        assert c.score == pytest.approx(scores[worst])  # the logged score stays the head's
    g = Chooser("greedy").choose(feats, scores, post, np.random.default_rng(0), offsets=boost)
    assert g.index == worst
