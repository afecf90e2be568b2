"""eval.py: the metrics of the paper (AUC, UAUC, warm/cold subsets) and the evaluation CLI.

Chapter two. Both numbers the paper reports are ranking measures of a score, so any model that
gives one number per (user, item) row can be evaluated here, a collaborative model or an LLM:
  - AUC: the chance that a random positive row scores above a random negative row (ties count 1/2);
  - UAUC: the AUC inside each user's own rows, averaged over users that have both a positive and a
    negative row (a user with one row or one class has no AUC and is skipped, and counted).
Warm rows: user and item each have more than 3 train rows. Cold rows: not_cold == 0.
"""
import numpy as np
from tqdm import tqdm

import data


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


def metrics_block(valid_report, test_report):
    """The metrics.json layout shared by collab.py and train.py."""
    return {"valid": valid_report["all"], "test": test_report["all"],
            "test_warm": test_report["warm"], "test_cold": test_report["cold"]}


# ---------------------------------------------------------------------------------------------
# Scoring a model: every row exactly once, sharded over processes, no gradients


def score_rows(model, enc, split, rows, batch_size, pad_id, device, dtype=None, rank=0, world=1):
    """-> (len(rows),) float64 scores of `model` (a CoLLM, unwrapped from DDP) for `rows` of a split.

    Rank r scores rows[r::world] (no DistributedSampler: it pads shards by repeating rows, which
    would count some rows twice) and the shards are gathered on every rank. Batches go longest
    first in length order, so padding is minimal; scores are put back in row order."""
    import torch
    mine = np.asarray(rows)[rank::world]
    scores = np.empty(len(mine))
    was_training = model.training
    model.eval()  # dropout off
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)
    with torch.no_grad(), amp:
        batches = data.eval_batches(enc.lengths[mine], batch_size)
        # a bar on rank 0 only; leave=False: it disappears when done, the caller prints the result
        for b in tqdm(batches, desc=f"scoring {len(rows):,} rows", disable=rank != 0, leave=False):
            batch = data.collate(enc, split, mine[b], pad_id, model.his_len)  # + history ids for SASRec / DIN
            scores[b] = model(**{k: v.to(device) for k, v in batch.items()}).float().cpu().numpy()
    model.train(was_training)
    if world == 1:
        return scores
    import torch.distributed as dist
    shards = [None] * world
    dist.all_gather_object(shards, scores)
    full = np.empty(len(rows))
    for r, shard in enumerate(shards):
        full[r::world] = shard
    return full


# ---------------------------------------------------------------------------------------------
# CLI: score a train.py checkpoint on a whole split


def print_table(title, rep):
    print(title)
    print(f"{'rows':<6}{'AUC':>8}{'UAUC':>8}{'users':>7}{'rows':>7}")
    for name, m in rep.items():
        print(f"{name:<6}{m['auc']:>8.4f}{m['uauc']:>8.4f}{m['uauc_users']:>7}{m['rows']:>7}")


# The paper's ML-1M test numbers (SPEC section 7; the LLM rows with Vicuna-7B), printed beside ours.
PAPER_ML1M = {"MF": (0.6482, 0.6361), "LightGCN": (0.5959, 0.6499), "SASRec": (0.7078, 0.6884),
              "DIN": (0.7166, 0.6459), "TALLRec": (0.7097, 0.6818), "CoLLM-MF": (0.7295, 0.6875),
              "CoLLM-LightGCN": (0.7100, 0.6967), "CoLLM-SASRec": (0.7235, 0.6990), "CoLLM-DIN": (0.7243, 0.6897)}
# pop (the popularity anchor) is not in the paper: its rows show "-" in the paper column
REC_NAMES = {"mf": "MF", "lightgcn": "LightGCN", "sasrec": "SASRec", "din": "DIN", "pop": "Pop"}


def results_table(run_dirs):
    """Runs' metrics.json files (train.py's or collab.py's) -> one Markdown table, a row per run."""
    import json
    import os
    lines = ["| run | method | llm | samples seen | test rows | test AUC | test UAUC | warm AUC | cold AUC | paper AUC / UAUC |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in run_dirs:
        path = os.path.join(run, "metrics.json") if os.path.isdir(run) else run
        if not os.path.isfile(path):
            raise data.UsageError(f"--table {run}: no metrics.json there (a train.py or collab.py --out folder)")
        try:
            with open(path) as f:
                m = json.load(f)
            if "stage" in m:  # train.py: stage 1 is TALLRec, stage 2 CoLLM with its collaborative model
                method = "TALLRec" if m["stage"] == "lora" else f"CoLLM-{REC_NAMES[m['rec']]}"
                llm, dataset = m["llm"], m["config"]["data"]
            else:  # collab.py
                method, llm, dataset = REC_NAMES[m["config"]["model"]], "-", m["config"]["data"]
            t, w, c, seen = m["test"], m["test_warm"], m["test_cold"], m["samples_seen"]
            row = (f"{t['auc']:.4f} | {t['uauc']:.4f} | {w['auc']:.4f} | {c['auc']:.4f}", t["rows"])
        except (ValueError, KeyError, TypeError) as e:
            raise data.UsageError(f"--table {path}: not a finished train.py or collab.py metrics.json "
                                  f"({type(e).__name__}: {e})")
        paper = PAPER_ML1M.get(method) if dataset == "ml-1m" else None
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        lines.append(f"| {name} | {method} | {llm} | {seen:,} | {row[1]:,} | {row[0]} | "
                     f"{f'{paper[0]:.4f} / {paper[1]:.4f}' if paper else '-'} |")
    return "\n".join(lines)


def main(argv=None):
    import argparse
    import json
    import os
    # Rebuilding a model from a checkpoint is train.py's knowledge (which LLM, which stage, which
    # tensors); importing it here, inside main, keeps the metrics above free of model code.
    import train
    p = argparse.ArgumentParser(description="Score a train.py checkpoint on every row of a split: AUC and "
                                            "UAUC overall, on warm rows and on cold rows. Or, with --table, "
                                            "tabulate finished runs.")
    p.add_argument("--ckpt", help="a train.py checkpoint (best.pt or last.pt)")
    p.add_argument("--table", nargs="+", metavar="RUN_DIR",
                   help="instead of scoring: print a Markdown results table of these train.py / collab.py "
                        "output folders (their metrics.json), with the paper's ML-1M numbers beside them")
    p.add_argument("--split", default="test", choices=("test", "valid", "valid_small"), help="split to score (default test)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per scoring batch (default 16)")
    p.add_argument("--rows", type=int, default=0, help="score only the first N rows (0 = all)")
    p.add_argument("--data-root", default=None, help="folder holding datasets (default: the checkpoint's setting)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run (default auto)")
    p.add_argument("--out", default=None, help="write metrics.json here instead of beside the checkpoint")
    a = p.parse_args(argv)
    if a.table:
        print(results_table(a.table))
        return
    if not a.ckpt:
        raise data.UsageError("give --ckpt CHECKPOINT to score, or --table RUN_DIR [RUN_DIR ...] to tabulate")
    if a.batch_size < 1 or a.rows < 0:
        raise data.UsageError("--batch-size must be >= 1 and --rows >= 0")
    if not os.path.isfile(a.ckpt):
        raise data.UsageError(f"--ckpt {a.ckpt}: file not found")
    state = train.load_checkpoint(a.ckpt)
    if "lora" not in state or "config" not in state:
        raise data.UsageError(f"--ckpt {a.ckpt}: not a train.py checkpoint (a collab.py model.pt? those are "
                              f"evaluated by collab.py itself)")
    cfg = train.Config(**{**state["config"], "device": a.device, "data_root": a.data_root or state["config"]["data_root"]})
    _, _, device = train.setup_distributed(cfg)
    dtype = train.amp_dtype(cfg, device)
    ds = data.load_dataset(cfg.data, cfg.data_root)
    model, tok = train.build_model(cfg, ds, dtype, state)
    model.to(device)
    if cfg.compile:  # scored as the run was trained (train.py --compile)
        train.collm.compile_decoder(model)
    enc = train.encode(cfg, ds, tok, a.split, model)
    rows = np.arange(len(ds.splits[a.split]))[:a.rows or None]
    pad = data.SegmentTokenizer(tok).pad_id
    scores = score_rows(model, enc, ds.splits[a.split], rows, a.batch_size, pad, device, dtype)
    rep = report(ds.splits[a.split], scores, rows)
    print_table(f"{a.ckpt} on {cfg.data} {a.split} ({cfg.stage}, {cfg.llm}, step {state['step']})", rep)
    out = a.out or os.path.dirname(os.path.abspath(a.ckpt))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "metrics.json")
    result = {}
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
    key = a.split
    result.update({key: rep["all"], f"{key}_warm": rep["warm"], f"{key}_cold": rep["cold"],
                   "stage": cfg.stage, "llm": cfg.llm})
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"-> {path}")


if __name__ == "__main__":
    data.cli_main(main)
