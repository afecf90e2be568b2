"""eval.py: the metrics of the paper (AUC, UAUC, warm/cold subsets) and scoring a model on a split.

Chapter two, before the models: the collaborative models (collab.py) and CoLLM (train.py) are both
chosen on valid AUC. Both of the paper's numbers rank a score, so any model giving one number per
(user, item) row, a collaborative model or an LLM, is evaluated the same way:
  - AUC: the chance that a random positive row scores above a random negative row (ties count 1/2);
  - UAUC: the AUC inside each user's own rows, averaged over users that have both a positive and a
    negative row (a user with one row or one class has no AUC and is skipped, and counted).
Warm rows: user and item each have more than 3 train rows. Cold rows: not_cold == 0.
Scoring is handed the model: rebuilding one from a checkpoint is train.py's, the commands tools/use.py's:

    python tools/use.py --ckpt runs/cie-mf/best.pt --split test      # AUC / UAUC of a checkpoint
"""
import json
import os

import numpy as np
from tqdm import tqdm

import data
from data import UsageError

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
    per_user = [value for value in per_user if not np.isnan(value)]
    return (float(np.mean(per_user)) if per_user else float("nan")), len(per_user)


def recall_ndcg_at_k(ranked, targets, k):
    """Top-K quality of one user's ranking, beyond the paper's AUC: `ranked` item ids best first,
    `targets` the items the user liked -> (Recall@k: the share of the targets in the top k; NDCG@k: the
    hits discounted by log2(rank + 1), over the best such sum the targets allow)."""
    targets = set(targets)
    hits = [item in targets for item in ranked[:k]]
    dcg = sum(1 / np.log2(rank + 2) for rank, hit in enumerate(hits) if hit)
    ideal = sum(1 / np.log2(rank + 2) for rank in range(min(len(targets), k)))
    return sum(hits) / len(targets), float(dcg / ideal)


def subsets(split, rows=None):
    """The row masks the paper reports: all rows, warm rows, cold rows (of `rows`, default all)."""
    rows = np.arange(len(split)) if rows is None else rows
    return {"all": np.ones(len(rows), bool), "warm": split.warm[rows], "cold": ~split.not_cold[rows]}


def report(split, scores, rows=None):
    """{"all"|"warm"|"cold": {"auc", "uauc", "uauc_users", "rows"}}; scores[k] belongs to row rows[k]."""
    rows = np.arange(len(split)) if rows is None else rows
    uid, label = split.uid[rows], split.label[rows]
    out = {}
    for name, m in subsets(split, rows).items():
        u, n = uauc(uid[m], label[m], scores[m])
        out[name] = {"auc": auc(label[m], scores[m]), "uauc": u, "uauc_users": n, "rows": int(m.sum())}
    return out


def check_both_classes(split, rows, what):
    """Rows of one class have no AUC (nan): said before a run trains for nothing and fails at its end."""
    labels = np.unique(split.label[rows])
    if len(labels) < 2:
        held = f"all labelled {int(labels[0])}" if len(labels) else "none at all"
        raise UsageError(f"{what}: {len(rows)} rows, {held}; AUC needs liked and not-liked rows: score more rows "
                         f"(0 = all)")

# ---------------------------------------------------------------------------------------------
# metrics.json, one per run folder (collab.py, train.py, tools/use.py): {"valid": {...}, "test": {...},
# "test_warm", "test_cold", ...}, each block {"auc", "uauc", "uauc_users", "rows"}; a split S adds S, S_warm, S_cold.


def split_block(rep, split):
    """report() of one split -> its metrics.json keys: {split, split_warm, split_cold}."""
    return {split: rep["all"], f"{split}_warm": rep["warm"], f"{split}_cold": rep["cold"]}


def metrics_block(valid, test_report):
    """What every finished run writes: the model-selection block (valid "all") and test in full, warm, cold."""
    return {"valid": valid, **split_block(test_report, "test")}


def write_metrics(path, result):
    """metrics.json (or any JSON result), written atomically: a reader never sees half of it."""
    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    data.write_atomic(path, dump)


# ---------------------------------------------------------------------------------------------
# Scoring a model: every row exactly once, sharded over processes, no gradients


def score_rows(model, enc, split, rows, batch_size, pad_id, device, dtype=None, rank=0, world=1, what="scoring"):
    """-> (len(rows),) float64 scores of `model` (a CoLLM, unwrapped from DDP) for `rows`, in row order.
    Batches keep one history's rows together (their prompt prefix runs once), longest first; rank r scores
    batches r, r + world, ... (a DistributedSampler would repeat rows) and every rank gathers every score."""
    import torch
    rows = np.asarray(rows)
    groups = data.prefix_groups(enc, rows) if getattr(model, "prefix_cache", False) else None
    mine = data.eval_batches(enc.lengths[rows], batch_size, enc.shared[rows], groups)[rank::world]
    scores = np.full(len(rows), np.nan)
    was_training = model.training
    model.eval()  # dropout off
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)
    with torch.no_grad(), amp:
        # leave=False: the bar disappears when done, the caller prints the result
        for b in tqdm(mine, desc=f"{what} {len(rows):,} rows", disable=rank != 0, leave=False):
            batch = data.collate(enc, split, rows[b], pad_id, model.his_len)  # + history ids for SASRec / DIN
            scores[b] = model(**{k: v.to(device) for k, v in batch.items()}).float().cpu().numpy()
    model.train(was_training)
    if world > 1:
        import torch.distributed as dist
        done = np.concatenate(mine) if mine else np.zeros(0, np.int64)
        shards = [None] * world
        dist.all_gather_object(shards, (done, scores[done]))
        for done, values in shards:
            scores[done] = values
    return scores


def score_catalog(model, enc, split, batch_size, pad_id, device, dtype=None, rows=None):
    """-> score_rows's scores of `rows` (default all) that mostly share their prompt up to the target title:
    one user's candidates (tools/use.py --user U --candidates unseen). Each distinct prefix (data.prefix_groups)
    runs once (collm.CoLLM.run_prefix), each batch only its rows' own tokens; score_rows for other models."""
    import torch
    rows = np.arange(len(split)) if rows is None else np.asarray(rows)
    if not model.shares_prefixes():
        return score_rows(model, enc, split, rows, batch_size, pad_id, device, dtype)
    groups = data.prefix_groups(enc, rows)
    scores = np.full(len(rows), np.nan)
    was_training = model.training
    model.eval()
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)
    with torch.no_grad(), amp, tqdm(total=len(rows), desc=f"scoring {len(rows):,} candidates", leave=False) as bar:
        for g in np.unique(groups):
            mine = np.flatnonzero(groups == g)
            scores[mine] = score_one_prefix(model, enc, split, rows[mine], batch_size, pad_id, device, bar)
    model.train(was_training)
    return scores


def score_one_prefix(model, enc, split, rows, batch_size, pad_id, device, bar):
    """score_catalog's scores of `rows`, which all share their first enc.shared tokens: those run once."""
    import torch
    to_device = lambda batch: {k: v.to(device) for k, v in batch.items()}
    first = to_device(data.collate(enc, split, rows[:1], pad_id, model.his_len))
    # every row's collaborative ids (stage 2): run_prefix checks whether the user slot differs among them
    ids = dict(uid=torch.from_numpy(split.uid[rows]).to(device), iid=torch.from_numpy(split.iid[rows]).to(device),
               his=torch.from_numpy(data.padded_history(split, model.his_len, rows)).to(device) if model.his_len else None)
    prefix = model.run_prefix(first, int(enc.shared[rows[0]]), **ids)
    scores = np.full(len(rows), np.nan)
    for b in data.eval_batches(enc.lengths[rows], batch_size):
        batch = to_device(data.collate(enc, split, rows[b], pad_id, model.his_len))
        scores[b] = model(**batch, prefix=prefix).float().cpu().numpy()
        bar.update(len(b))
    return scores


def read_metrics(run, flag):
    """A run folder (or its metrics.json) -> (path, the parsed file); a UsageError if missing or unreadable."""
    path = os.path.join(run, "metrics.json") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {run}: no metrics.json there (a train.py or collab.py --out folder)")
    try:
        with open(path) as f:
            return path, json.load(f)
    except ValueError as e:
        raise UsageError(f"{flag} {path}: not a finished train.py or collab.py metrics.json "
                         f"({type(e).__name__}: {e})")


def print_table(title, rep):
    """report() as a small table under `title`: AUC and UAUC of all, warm and cold rows."""
    print(title)
    print(f"{'rows':<6}{'AUC':>8}{'UAUC':>8}{'users':>7}{'rows':>7}")
    for name, m in rep.items():
        print(f"{name:<6}{m['auc']:>8.4f}{m['uauc']:>8.4f}{m['uauc_users']:>7}{m['rows']:>7}")
