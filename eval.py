"""eval.py: the metrics of the paper (AUC, UAUC, warm/cold subsets) and the evaluation CLI.

Chapter two. Both numbers the paper reports are ranking measures of a score, so any model that
gives one number per (user, item) row can be evaluated here, a collaborative model or an LLM:
  - AUC: the chance that a random positive row scores above a random negative row (ties count 1/2);
  - UAUC: the AUC inside each user's own rows, averaged over users that have both a positive and a
    negative row (a user with one row or one class has no AUC and is skipped, and counted).
Warm rows: user and item each have more than 3 train rows. Cold rows: not_cold == 0.
"""
import numpy as np


# ---------------------------------------------------------------------------------------------
# Metrics as plain functions


def auc(labels, scores):
    """Rank-based AUC (the Mann-Whitney U statistic), ties counting one half; nan for one class."""
    labels = np.asarray(labels) > 0.5
    scores = np.asarray(scores, np.float64)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # average rank of each score (1-based); tied scores share the mean of their ranks
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)                  # rank of the last member of each tie group
    avg_rank = (ends - (counts - 1) / 2.0)[inverse]
    return float((avg_rank[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def uauc(users, labels, scores):
    """-> (mean per-user AUC over users with both classes, number of such users)."""
    users, labels, scores = np.asarray(users), np.asarray(labels), np.asarray(scores)
    order = np.argsort(users, kind="stable")
    cuts = np.flatnonzero(np.diff(users[order])) + 1
    per_user = [auc(labels[g], scores[g]) for g in np.split(order, cuts)]
    per_user = [a for a in per_user if not np.isnan(a)]
    return (float(np.mean(per_user)) if per_user else float("nan")), len(per_user)


def subsets(split):
    """The row masks the paper reports: all rows, warm rows, cold rows."""
    return {"all": np.ones(len(split), bool), "warm": split.warm, "cold": ~split.not_cold}


def report(split, scores):
    """{"all"|"warm"|"cold": {"auc", "uauc", "uauc_users", "rows"}} for one split's scores."""
    out = {}
    for name, m in subsets(split).items():
        u, n = uauc(split.uid[m], split.label[m], scores[m])
        out[name] = {"auc": auc(split.label[m], scores[m]), "uauc": u, "uauc_users": n, "rows": int(m.sum())}
    return out


def metrics_block(valid_report, test_report):
    """The metrics.json layout shared by collab.py and train.py."""
    return {"valid": valid_report["all"], "test": test_report["all"],
            "test_warm": test_report["warm"], "test_cold": test_report["cold"]}
