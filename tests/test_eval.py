"""Tests for eval.py: AUC and UAUC against brute-force definitions, and the warm/cold report."""
import numpy as np
import pytest

import data
import eval
from test_data import TEST, write_dataset


def brute_auc(labels, scores):
    """The definition: over all (positive, negative) pairs, count pos > neg as 1 and a tie as 1/2."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def brute_uauc(users, labels, scores):
    """Per-user brute-force AUC, averaged over users that have both classes."""
    per_user = [brute_auc(labels[users == u], scores[users == u]) for u in np.unique(users)
                if len(set(labels[users == u])) == 2]
    return np.mean(per_user), len(per_user)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 500).astype(np.float32)
    scores = np.round(rng.normal(labels * 0.5, 1.0), 1)  # about 60 distinct values: many ties
    assert len(np.unique(scores)) < 100
    assert eval.auc(labels, scores) == pytest.approx(brute_auc(labels, scores), abs=1e-12)


@pytest.mark.parametrize("labels,scores,expected", [
    ([0, 1], [0.1, 0.9], 1.0),
    ([1, 0], [0.1, 0.9], 0.0),
    ([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5], 0.5),               # all tied
    ([1, 0, 1, 0], [0.8, 0.4, 0.4, 0.2], 3.5 / 4),           # one tied pair of four
    ([1, 1, 0, 0, 0], [3.0, 1.0, 2.0, 1.0, 0.0], 4.5 / 6),   # pos 3 beats all; pos 1 beats 0, ties 1
])
def test_auc_small_cases_by_hand(labels, scores, expected):
    assert eval.auc(labels, scores) == pytest.approx(expected)


def test_auc_of_one_class_is_nan():
    assert np.isnan(eval.auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert np.isnan(eval.auc([0, 0], [0.1, 0.2]))


def test_uauc_matches_per_user_loop():
    rng = np.random.default_rng(0)
    users = rng.integers(1, 60, 800)
    labels = rng.integers(0, 2, 800)
    labels[users == 7] = 1                        # a one-class user: skipped
    users = np.append(users, [100, 101])          # two users with one row each: skipped
    labels = np.append(labels, [1, 0])
    scores = np.round(rng.normal(labels * 0.3, 1.0), 1)
    got, n = eval.uauc(users, labels, scores)
    want, want_n = brute_uauc(users, labels, scores)
    assert got == pytest.approx(want, abs=1e-12) and n == want_n < len(np.unique(users)) - 3


def test_uauc_by_hand():
    # user 1: pos 0.9 > neg 0.1 -> 1; user 2: neg 0.8 > pos 0.2 -> 0; user 3: one class; user 4: one row
    got, n = eval.uauc([1, 1, 2, 2, 3, 3, 4], [1, 0, 1, 0, 1, 1, 0], [0.9, 0.1, 0.2, 0.8, 0.5, 0.6, 0.3])
    assert (got, n) == (0.5, 2)
    got, n = eval.uauc([1, 2], [1, 0], [0.5, 0.5])
    assert np.isnan(got) and n == 0


def test_report_warm_and_cold_subsets(tmp_path):
    test = data.load_dataset(write_dataset(tmp_path), tmp_path).splits["test"]
    # rows 0-2 warm, 5-7 cold (see TEST in test_data.py)
    scores = np.array([0.9, 0.3, 0.2, 0.6, 0.1, 0.4, 0.7, 0.5])
    rep = eval.report(test, scores)
    assert {k: v["rows"] for k, v in rep.items()} == {"all": 8, "warm": 3, "cold": 3}
    # warm rows: user 1 (label 1 at 0.9, label 0 at 0.3), user 2 (label 1 at 0.2): AUC pairs 0.9>0.3, 0.2<0.3
    assert rep["warm"] == {"auc": 0.5, "uauc": 1.0, "uauc_users": 1, "rows": 3}
    labels = np.array([r[2] for r in TEST])
    assert rep["all"]["auc"] == pytest.approx(brute_auc(labels, scores))
    cold = np.array([5, 6, 7])
    assert rep["cold"]["auc"] == pytest.approx(brute_auc(labels[cold], scores[cold]))
    assert rep["cold"]["uauc_users"] == 0 and np.isnan(rep["cold"]["uauc"])  # one row per cold user
    assert eval.report(test, scores[:3], rows=np.arange(3))["all"] == rep["warm"]  # scores of some rows only
    block = eval.metrics_block(rep, rep)
    assert block["test_warm"] is rep["warm"] and block["test_cold"] is rep["cold"] and block["valid"] is rep["all"]
