import math

import pytest

from eval.metrics import mean_metrics, ndcg_at_k, recall_at_k

pytestmark = pytest.mark.one_engine


def test_hit_at_rank_3_by_hand():
    ranked = ["a", "b", "t", "c"]
    assert recall_at_k(ranked, "t", 2) == 0.0 and recall_at_k(ranked, "t", 3) == 1.0
    assert ndcg_at_k(ranked, "t", 3) == pytest.approx(1 / math.log2(4)) == pytest.approx(0.5)
    assert ndcg_at_k(ranked, "t", 2) == 0.0 and ndcg_at_k(["t"], "t", 1) == 1.0


def test_means_over_users_by_hand():
    # user 1 hits at rank 1, user 2 at rank 3, user 3 misses
    result = mean_metrics([(["t"], "t"), (["x", "y", "t"], "t"), (["x"], "t")], ks=(1, 5))
    assert result["recall@1"] == pytest.approx(1 / 3)
    assert result["recall@5"] == pytest.approx(2 / 3)
    assert result["ndcg@5"] == pytest.approx((1 + 0.5) / 3)
