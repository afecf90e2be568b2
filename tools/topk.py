"""tools/topk.py: top-K recommendation quality in the test period, which the paper's pointwise AUC does not
measure. It scores each collaborative model alone, then CoLLM reranking its own model's top N
(retrieve-then-rerank, docs/USE.md). This is the table in docs/RESULTS.md:

    python tools/topk.py checkpoints/tallrec-smollm2 checkpoints/collm-{mf,lightgcn,sasrec,din}-smollm2 \
        --out runs/topk.json

The protocol is RecBole's full ranking, on the CoLLM split:
  - users: a seeded sample of --users test users, each with at least one liked test item it did not
    also rate in train or valid;
  - candidates: every item of the data the user has not rated in train or valid. That includes the items
    it rated in the test period, liked or not. The targets are its liked test items;
  - every candidate gets the history the user had when the test period began (its first test row's);
  - each ranking is cut at --k: Recall@k and NDCG@k (eval.recall_ndcg_at_k), averaged over the users.
Rows: pop and each checkpoint's collaborative model rank all the candidates; "Recall@N" is the share of
targets in that model's top N, the most a reranker of that list can reach; a checkpoint row is its LLM
ordering its collaborative model's top N (a stage-1 checkpoint reranks pop's top N).
"""
import argparse
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the chapters, one folder up
import collab  # noqa: E402
import collm  # noqa: E402
import data  # noqa: E402
import eval as metrics  # noqa: E402  (our eval.py)
import train  # noqa: E402
from data import UsageError  # noqa: E402
from tools import use  # noqa: E402  (RETRIEVE, the same default N as --candidates unseen)


def parse(argv=None):
    """The command line; every bad number in one line."""
    p = argparse.ArgumentParser(prog="tools/topk.py", description="Top-K quality in the test period: Recall@k and "
                                "NDCG@k of pop and of each checkpoint's collaborative model ranking every unrated "
                                "item, and of each checkpoint's LLM reranking that model's top N.")
    p.add_argument("ckpts", nargs="+", metavar="CKPT", help="train.py checkpoints (best.pt) or export folders (the "
                   "shipped checkpoints/); stage 2 reranks its own collaborative model's top N, stage 1 pop's")
    p.add_argument("--users", type=int, default=200, help="how many test users to sample (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the user sample (default 0)")
    p.add_argument("--k", type=int, default=10, help="cut every ranking at K: Recall@K, NDCG@K (default 10)")
    p.add_argument("--retrieve", type=int, default=use.RETRIEVE,
                   help=f"N: how many of the collaborative model's best items the LLM reranks (default {use.RETRIEVE}, "
                        f"tools/use.py's)")
    p.add_argument("--batch-size", type=int, default=16, help="LLM rows per scoring batch (default 16)")
    p.add_argument("--data-root", default=None, help="folder holding datasets (default: the checkpoints' setting)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run (default auto)")
    p.add_argument("--dtype", default=None, choices=("auto", "bf16", "fp16", "fp32"),
                   help="compute dtype (default: each run's own --dtype)")
    p.add_argument("--out", help="also write the table, the sampled users and each user's top K as JSON here")
    args = p.parse_args(argv)
    bad = [f"--{name} must be >= 1 (got {getattr(args, name.replace('-', '_'))})"
           for name in ("users", "k", "retrieve", "batch-size") if getattr(args, name.replace("-", "_")) < 1]
    if bad:
        raise UsageError("; ".join(bad))
    return args


# ---------------------------------------------------------------------------------------------
# The protocol: whose rankings, of which items, against which targets


def test_period(ds, user, known):
    """-> (a Split of the user's candidates: every item in `known` (items_in_data) that the user has not
    rated in train or valid, each with the history the user had when the test period began, label 1 for a
    target; the target ids: its liked test items among them)."""
    te = ds.splits["test"]
    rated = np.concatenate([ds.splits[s].iid[ds.splits[s].uid == user] for s in ("train", "valid")])
    items = np.flatnonzero(known & ~np.isin(np.arange(len(known)), rated))
    rows = np.flatnonzero(te.uid == user)
    # histories only grow, so the shortest history of the user's test rows is the one the period began with
    history = te.history(rows[np.argmin(np.diff(te.his_ptr)[rows])]) if len(rows) else np.zeros(0, np.int64)
    targets = np.intersect1d(te.iid[rows][te.label[rows] > 0.5], items)
    n = len(items)
    split = data.Split(uid=np.full(n, user, np.int64), iid=items.astype(np.int64),
                       label=np.isin(items, targets).astype(np.float32), not_cold=np.zeros(n, bool),
                       his_ptr=np.arange(n + 1, dtype=np.int64) * len(history), his_items=np.tile(history, n))
    return split, targets


def sample_users(ds, n, seed, known):
    """`n` users drawn with `seed` from the test users that have a target, in id order."""
    te = ds.splits["test"]
    able = [u for u in np.unique(te.uid[te.label > 0.5]) if len(test_period(ds, u, known)[1])]
    if n > len(able):
        raise UsageError(f"--users {n}: {ds.name}'s test split has {len(able)} users with a liked test item they did "
                         f"not rate in train or valid; ask for at most that many")
    return np.sort(np.random.default_rng(seed).choice(able, n, replace=False))


def top_k(items, scores, k):
    """Item ids ordered by score, best first (a tie keeps the given order), the first k."""
    return items[np.argsort(-scores, kind="stable")][:k]


def averaged(rankings, targets, k):
    """{user: ranked ids} -> (mean Recall@k, mean NDCG@k) over the users."""
    got = np.array([metrics.recall_ndcg_at_k(list(rankings[u]), targets[u], k) for u in rankings])
    return float(got[:, 0].mean()), float(got[:, 1].mean())


# ---------------------------------------------------------------------------------------------
# The table


def load(path, args):
    """A checkpoint or export folder -> (its state, its train.Config with this command's device/dtype/root),
    as tools/use.py loads one."""
    state, saved = use.load_for_evaluation(argparse.Namespace(ckpt=path, export=None, device=args.device,
                                                              dtype=args.dtype, data_root=args.data_root), "CKPT")
    return state, train.Config(**saved)


def rec_row(name, model, users, split_of, targets, k, n):
    """A collaborative model ranking every candidate: its row, each user's top n (ids, scores) and top k."""
    tops, ranked = {}, {}
    for u in users:
        split = split_of(u)
        scores = collab.score(model, split)
        order = np.argsort(-scores, kind="stable")
        tops[u] = (split.iid[order[:n]], scores[order[:n]])
        ranked[u] = split.iid[order]
    recall, ndcg = averaged(ranked, targets, k)
    ceiling, _ = averaged(ranked, targets, n)
    row = {"model": name, "ranks": "every candidate", "recall": recall, "ndcg": ndcg, "recall_at_n": ceiling}
    return row, tops, {u: ranked[u][:k].tolist() for u in users}


def rerank_row(name, rec_name, path, model, tok, cfg, ds, tops, users, history_of, targets, args, device, dtype):
    """The LLM of one checkpoint scoring the retriever's top N of every user: its row and each user's top k."""
    n_rows = [len(tops[u][0]) for u in users]
    items = np.concatenate([tops[u][0] for u in users])
    hist = [history_of[u] for u, n in zip(users, n_rows) for _ in range(n)]
    split = data.Split(uid=np.repeat(users, n_rows).astype(np.int64), iid=items.astype(np.int64),
                       label=np.zeros(len(items), np.float32), not_cold=np.zeros(len(items), bool),
                       his_ptr=np.concatenate([[0], np.cumsum([len(h) for h in hist])]).astype(np.int64),
                       his_items=np.concatenate(hist).astype(np.int64))
    enc = collm.encode(cfg, dataclasses.replace(ds, splits={**ds.splits, "topk": split}), tok, "topk", model)
    # one user's rows share the prompt up to the target title: score_catalog runs that prefix once per user
    scores = metrics.score_catalog(model, enc, split, args.batch_size, data.SegmentTokenizer(tok).pad_id, device, dtype)
    ranked, start = {}, 0
    for u, n in zip(users, n_rows):
        ranked[u] = top_k(items[start:start + n], scores[start:start + n], n)  # ties keep the retriever's order
        start += n
    recall, ndcg = averaged(ranked, targets, args.k)
    return ({"model": name, "ckpt": path, "ranks": f"its top {args.retrieve} by {rec_name}", "recall": recall, "ndcg": ndcg,
             "recall_at_n": None, "llm_rows": len(items)}, {u: ranked[u][:args.k].tolist() for u in users})


def main(argv=None):
    args = parse(argv)
    start = time.time()
    loaded = [load(path, args) for path in args.ckpts]  # every bad path before anything slow
    names = {cfg.data for _, cfg in loaded}
    if len(names) > 1:
        raise UsageError(f"the checkpoints were trained on different data ({', '.join(sorted(names))}); give "
                         f"checkpoints of one dataset")
    cfg0 = loaded[0][1]
    ds = data.load_dataset(cfg0.data, cfg0.data_root)
    known = data.items_in_data(ds)
    users = sample_users(ds, args.users, args.seed, known)
    periods = {u: test_period(ds, u, known) for u in users}
    targets = {u: periods[u][1].tolist() for u in users}
    history_of = {u: periods[u][0].history(0) for u in users}
    split_of = lambda u: periods[u][0]  # noqa: E731
    print(f"=> {len(users)} users of {ds.name}'s test period (seed {args.seed}): "
          f"{np.mean([len(periods[u][0]) for u in users]):,.0f} candidates and "
          f"{np.mean([len(targets[u]) for u in users]):.1f} targets a user on average")
    tr = ds.splits["train"]
    pop = collab.build_model("pop", ds.user_num, ds.item_num).fit(tr.iid, tr.label).eval()
    alone, reranked, tops, lists = [], [], {}, {}

    def retriever_row(name, model):  # each collaborative model once, however many checkpoints read it
        if name not in tops:
            row, tops[name], lists[name] = rec_row(name, model, users, split_of, targets, args.k, args.retrieve)
            alone.append(row)
    retriever_row("pop", pop)
    for path, (state, cfg) in zip(args.ckpts, loaded):
        _, _, device = train.setup_distributed(cfg)
        dtype, dtype_name, _ = train.compute_dtype(cfg.dtype, device)
        model, tok = train.build_model(cfg, ds, dtype, state)
        model.to(device)
        rec = "pop" if model.rec is None else collab.model_name(model.rec)
        retriever_row(rec, pop if model.rec is None else use.retriever_of(None, model, ds)[0])
        name = "TALLRec" if cfg.stage == "lora" else f"CoLLM-{collab.MODELS[rec].name}"
        began = time.time()
        row, lists[path] = rerank_row(name, rec, path, model, tok, cfg, ds, tops[rec], users,
                                      history_of, targets, args, device, dtype)
        reranked.append({**row, "seconds": round(time.time() - began, 1), "dtype": dtype_name})
        print(f"   {path}: {row['llm_rows']:,} rows in {reranked[-1]['seconds']:.0f} s")
        del model
    rows = alone + reranked  # the collaborative models first, then the LLMs reranking them
    print(f"\n| model | ranks | Recall@{args.k} | NDCG@{args.k} | Recall@{args.retrieve} |\n|---|---|---|---|---|")
    for row in rows:
        ceiling = "" if row["recall_at_n"] is None else f"{row['recall_at_n']:.4f}"
        print(f"| {row['model']} | {row['ranks']} | {row['recall']:.4f} | {row['ndcg']:.4f} | {ceiling} |")
    seconds = time.time() - start
    print(f"{len(users)} users, k {args.k}, N {args.retrieve}: {seconds / 60:.1f} min")
    if args.out:
        result = {"command": "python tools/topk.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "data": ds.name, "users": len(users), "seed": args.seed, "k": args.k, "retrieve": args.retrieve,
                  "rows": rows, "seconds": round(seconds, 1), "user_ids": users.tolist(),
                  "targets": {int(u): targets[u] for u in users},
                  "top_k": {name: {int(u): got[u] for u in users} for name, got in lists.items()}}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        metrics.write_metrics(args.out, result)
        print(f"-> {args.out}")


if __name__ == "__main__":
    data.cli_main(main)
