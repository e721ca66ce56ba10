"""What a planted-conflict summary.json must hold for each arm of a cell, at either level."""

from stgc_experiments.planted.meter import VARIANTS

ARM_FIELDS = ("detection_auc", "precision", "recall", "reroute_rate_planted", "reroute_rate_other", "metric")


def assert_arms_complete(arms: dict, seeds: list[int]) -> None:
    """The four roles, each over `seeds`, with its figures, every cosine variant's detection, and its
    paired intervals (against the baseline; STGC and the oracle also against random)."""
    assert set(arms) == {"baseline", "stgc", "random", "oracle"}
    for role, arm in arms.items():
        assert arm["seeds"] == seeds, role
        for key in ARM_FIELDS:
            assert key in arm, (role, key)
        assert set(arm["detection"]) == set(VARIANTS), role
        deltas = ("delta_vs_baseline",) + (("delta_vs_random",) if role != "baseline" else ())
        for key in deltas:
            assert set(arm[key]) == {"mean", "low", "high", "seeds"}, (role, key)
