"""collab.py: the collaborative models CoLLM borrows its user/item embeddings from (paper section 4.2).

Chapter three. Two classic recommenders, each trained alone on the same pointwise task as the LLM
(label = liked or not, binary cross-entropy on a dot-product logit), with Adam + L2 weight decay and
early stopping on the FULL valid AUC (SPEC sections 4 and 5):
  - MF: one learned vector per user and per item; score = their dot product.
  - LightGCN (He et al. 2020): the same vectors, smoothed over the graph of train positives before
    the dot product, so a user's vector also carries the items their neighbours liked.
Neither model has anything to say about an id that never occurs in train (on ML-1M, 42% of the
test rows come from users who are new in the test period): see `UNSEEN` below for what we do instead.
CoLLM (collm.py) only needs `model.tables()` -> (U, I) and `model.dim`; `load_rec` rebuilds a model
from the checkpoint this script writes, without the dataset.

    python collab.py --model mf --data ml-1m --out runs/mf               # about 30 s on 2 CPU cores
    python collab.py --model lightgcn --data ml-1m --out runs/lightgcn   # about 22 s
"""
import argparse
import json
import os
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import eval  # our eval.py (it shadows the builtin eval(), which nothing here uses)

# Best mean valid AUC over seeds 0-2 in a grid on ML-1M (lr 1e-3..1e-2, wd 1e-6..1e-3, d 64/256), with
# unseen="mean" (below). For MF that is SPEC section 5's own setting (d=256, lr 1e-3, wd 1e-4: valid
# 0.7108; d=64 gives 0.7098 in a third of the time). LightGCN's lr 1e-2 wd 1e-4 came within 0.004.
# wd is the knob that matters: 1e-3 stops learning (valid AUC 0.55); for MF 1e-5 and below overfits.
DEFAULTS = {"mf": dict(dim=256, lr=1e-3, wd=1e-4),
            "lightgcn": dict(dim=64, lr=3e-3, wd=1e-5, layers=2)}
INIT_STD = 0.1  # N(0, 0.1) init (LightGCN's); nn.Embedding's N(0, 1) makes d=256 dot products ~16 at step 0

# An id with no train rows never gets a gradient from the data, only from the weight decay, which
# Adam shrinks to ~0 within a few epochs: the reference scores such a user with a near-zero vector
# of random direction, a coin flip per user. "mean" (our default) gives it the mean of the trained
# rows instead: a new user is scored as the average user (the items most users liked rank first),
# the usual cold-start fallback. It changes no trained row and no train step, only the tables that
# scoring and CoLLM read. "untouched" keeps the reference's behaviour. Measured on ML-1M (README).
UNSEEN = ("mean", "untouched")


def mean_for_unseen(table, seen):
    """(n, d) table with the rows where seen is False replaced by the mean of the seen rows."""
    return torch.where(seen[:, None], table, table[seen].mean(0))


def register_seen(model, user_num, item_num, seen):
    """Buffers user_seen / item_seen (bool, one per id) that tables() reads; seen=None marks every id seen,
    which makes mean_for_unseen a no-op. Buffers, so checkpoints carry them."""
    user_seen, item_seen = seen if seen is not None else (np.ones(user_num, bool), np.ones(item_num, bool))
    model.register_buffer("user_seen", torch.as_tensor(user_seen, dtype=torch.bool))
    model.register_buffer("item_seen", torch.as_tensor(item_seen, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# Models. Both expose `dim`, `tables()` -> (U (user_num, d), I (item_num, d)) and forward(uid, iid).


class MF(nn.Module):
    """Matrix factorisation: logit(u, i) = <U[u], I[i]>. CoLLM uses the tables as they are
    (bar the unseen rows)."""

    def __init__(self, user_num, item_num, dim=256, seen=None):
        super().__init__()
        self.dim = dim
        self.user = nn.Embedding(user_num, dim, padding_idx=0)  # row 0 = padding, stays zero
        self.item = nn.Embedding(item_num, dim, padding_idx=0)
        for table in (self.user, self.item):
            nn.init.normal_(table.weight, std=INIT_STD)
            table.weight.data[0] = 0
        register_seen(self, user_num, item_num, seen)

    def tables(self):
        return mean_for_unseen(self.user.weight, self.user_seen), mean_for_unseen(self.item.weight, self.item_seen)

    def forward(self, uid, iid):
        U, I = self.tables()
        return (U[uid] * I[iid]).sum(-1)  # (B,)


def normalized_adjacency(edges, user_num, item_num):
    """A_hat = D^-1/2 A D^-1/2 of the user-item bipartite graph, as a sparse (n, n) COO tensor.

    Nodes are users 0..user_num-1 then items (offset by user_num); A holds a 1 for each distinct
    (user, item) edge in both directions, no self loops; D = node degrees."""
    u, i = torch.as_tensor(edges, dtype=torch.long).reshape(-1, 2).unique(dim=0).T  # a repeat is one edge
    n = user_num + item_num
    rows = torch.cat([u, i + user_num])  # user -> item and item -> user
    cols = torch.cat([i + user_num, u])
    d_inv_sqrt = torch.bincount(rows, minlength=n).float().pow(-0.5)  # inf only on edgeless nodes, never read
    values = d_inv_sqrt[rows] * d_inv_sqrt[cols]
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, n), check_invariants=True).coalesce()


class LightGCN(nn.Module):
    """LightGCN: E = mean(E0, A_hat E0, ..., A_hat^L E0), split back into U and I; logit = <U[u], I[i]>.

    No weights or nonlinearities between layers: propagation only averages neighbours, so E0 are the
    only parameters. The train edges are a buffer, so the checkpoint carries the graph with it."""

    def __init__(self, user_num, item_num, edges, dim=64, layers=2, seen=None):
        super().__init__()
        self.dim, self.layers, self.user_num, self.item_num = dim, layers, user_num, item_num
        self.user = nn.Embedding(user_num, dim)
        self.item = nn.Embedding(item_num, dim)
        nn.init.normal_(self.user.weight, std=INIT_STD)
        nn.init.normal_(self.item.weight, std=INIT_STD)
        self.register_buffer("edges", torch.as_tensor(edges, dtype=torch.long).reshape(-1, 2))  # (E, 2)
        # Rebuilt from `edges` on load, so it stays out of the state_dict (persistent=False). CSR makes
        # A_hat @ E and its backward about 2x faster than COO here; torch calls CSR "beta" (a warning).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            adj = normalized_adjacency(self.edges, user_num, item_num).to_sparse_csr()
        self.register_buffer("adj", adj, persistent=False)
        register_seen(self, user_num, item_num, seen)

    def tables(self):
        E = torch.cat([self.user.weight, self.item.weight])  # (n, d), users then items
        layers = [E]
        for _ in range(self.layers):
            layers.append(torch.sparse.mm(self.adj, layers[-1]))  # (n, d): one hop of neighbour averaging
        E = torch.stack(layers).mean(0)  # (n, d): layer 0 keeps each node's own vector in the mix
        U, I = E.split([self.user_num, self.item_num])
        return mean_for_unseen(U, self.user_seen), mean_for_unseen(I, self.item_seen)

    def forward(self, uid, iid):
        U, I = self.tables()  # a full propagation per call (~3 ms on ML-1M): every step moves E0
        return (U[uid] * I[iid]).sum(-1)  # (B,)


MODELS = {"mf": MF, "lightgcn": LightGCN}


def build_model(name, user_num, item_num, dim, layers, edges, seen=None):
    """The one place that knows each constructor's arguments (train_rec and load_rec share it)."""
    extra = dict(edges=edges, layers=layers) if name == "lightgcn" else {}
    return MODELS[name](user_num, item_num, dim=dim, seen=seen, **extra)


def train_graph(ds):
    """(E, 2) (user, item) pairs of the train positives: the graph LightGCN propagates over."""
    tr = ds.splits["train"]
    return np.stack([tr.uid, tr.iid], 1)[tr.label == 1]


def seen_in_train(ds, unseen="mean"):
    """(user_seen, item_seen) bool arrays: which ids have at least one train row (liked or not).
    None for unseen="untouched": every id then keeps its own row, as in the reference."""
    if unseen == "untouched":
        return None
    tr = ds.splits["train"]
    return (np.bincount(tr.uid, minlength=ds.user_num) > 0), (np.bincount(tr.iid, minlength=ds.item_num) > 0)


def new_rec(name, ds):
    """A freshly initialised model with the default settings (CoLLM's --tune-rec from scratch)."""
    cfg = DEFAULTS[name]
    return build_model(name, ds.user_num, ds.item_num, cfg["dim"], cfg.get("layers"), train_graph(ds),
                       seen_in_train(ds))


def rec_checkpoint(model):
    """The checkpoint dict this script saves (train.py embeds it in CoLLM checkpoints too)."""
    name = "lightgcn" if isinstance(model, LightGCN) else "mf"
    cfg = dict(user_num=model.user.num_embeddings, item_num=model.item.num_embeddings, dim=model.dim,
               layers=getattr(model, "layers", None))
    return {"model": name, "config": cfg, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}


def rec_from_checkpoint(ckpt, user_num=None, item_num=None, where="checkpoint"):
    """A model from a checkpoint dict, in eval mode; checks the table sizes if given."""
    try:
        name, cfg, state = ckpt["model"], ckpt["config"], ckpt["state_dict"]
        have = (cfg["user_num"], cfg["item_num"])
        model = build_model(name, *have, cfg["dim"], cfg.get("layers"), state.get("edges"))
        model.load_state_dict(state)
    except Exception as e:  # a foreign checkpoint, a missing key: all mean "not ours"
        raise data.UsageError(f"{where}: not a collab.py checkpoint ({type(e).__name__}: {e})")
    want = (user_num or have[0], item_num or have[1])
    if have != want:  # ids would index the wrong rows (or past the end) without a word
        raise data.UsageError(f"{where}: tables are {have[0]} users x {have[1]} items, expected "
                              f"{want[0]} x {want[1]} (a model trained on another dataset?)")
    return model.eval()


def load_rec(path, user_num=None, item_num=None):
    """A model from a model.pt of this script, in eval mode; checks table sizes if given."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise data.UsageError(f"{path}: file not found")
    except Exception as e:  # a truncated file, not a torch file
        raise data.UsageError(f"{path}: not a collab.py checkpoint ({type(e).__name__}: {e})")
    return rec_from_checkpoint(ckpt, user_num, item_num, where=path)


# ---------------------------------------------------------------------------------------------
# Training: pointwise BCE, one shuffled pass over the train rows per epoch, keep the best valid AUC


@torch.no_grad()
def score(model, split):
    """(N,) numpy logits of every row of a split (one propagation, then a lookup per row)."""
    U, I = model.tables()
    return (U[torch.tensor(split.uid)] * I[torch.tensor(split.iid)]).sum(-1).numpy()


def train_rec(ds, model_name, dim=None, lr=None, wd=None, batch_size=1024, epochs=300, patience=50,
              seed=0, layers=None, unseen="mean", progress=True):
    """Train one model on ds (a data.Dataset) -> (model with the best-valid-AUC weights, metrics dict)."""
    cfg = dict(DEFAULTS[model_name])
    cfg.update({k: v for k, v in dict(dim=dim, lr=lr, wd=wd, layers=layers).items() if v is not None})
    cfg.update(model=model_name, batch_size=batch_size, epochs=epochs, patience=patience, seed=seed,
               unseen=unseen, user_num=ds.user_num, item_num=ds.item_num)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)  # the epoch shuffles; torch's generator only draws the init
    tr, va, te = ds.splits["train"], ds.splits["valid"], ds.splits["test"]
    model = build_model(model_name, ds.user_num, ds.item_num, cfg["dim"], cfg.get("layers"), train_graph(ds),
                        seen_in_train(ds, unseen))
    # Adam's weight_decay adds wd * w to the gradient: classic L2, as the paper's baselines use.
    # fused=True: one kernel for the whole update, ~20x faster than the default on CPU here.
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["wd"], fused=True)
    uid, iid, label = (torch.tensor(a) for a in (tr.uid, tr.iid, tr.label))  # copies: may be read-only arrays
    steps = -(-len(tr) // batch_size)
    print(f"=> {model_name}: {ds.user_num} x {ds.item_num} tables, d={cfg['dim']}, {len(tr):,} train rows, "
          f"{steps} steps/epoch" + (f", {len(model.edges):,} graph edges" if model_name == "lightgcn" else ""))
    start, best_auc, best_epoch, best_state = time.time(), -1.0, 0, None
    bar = tqdm(range(1, epochs + 1), desc=model_name, disable=not progress)
    for epoch in bar:
        model.train()
        losses = []
        for rows in np.array_split(rng.permutation(len(tr)), steps):  # near-equal batches, none tiny
            rows = torch.from_numpy(rows)
            loss = F.binary_cross_entropy_with_logits(model(uid[rows], iid[rows]), label[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        valid_auc = eval.auc(va.label, score(model.eval(), va))
        if valid_auc > best_auc:  # keep a copy of the best weights, not a file per epoch
            best_auc, best_epoch = valid_auc, epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        bar.set_postfix(loss=f"{np.mean(losses):.4f}", valid_auc=f"{valid_auc:.4f}", best=best_epoch)
        if epoch - best_epoch >= patience:  # no better valid AUC for `patience` epochs: stop
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    metrics = eval.metrics_block(eval.report(va, score(model, va)), eval.report(te, score(model, te)))
    metrics.update(best_epoch=best_epoch, samples_seen=epoch * len(tr), seconds=round(time.time() - start, 2),
                   config=cfg)
    return model, metrics


# ---------------------------------------------------------------------------------------------
# CLI


def write_atomic(path, write):
    """write(tmp_path) into a temp file next to `path`, then rename: a crash never leaves half a file."""
    # (torch.save rejects some dot-names such as ".tmp-x": keep the final name in front)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".",
                               suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def main(argv=None):
    def per_model(key):  # "256 mf, 64 lightgcn": the help text follows DEFAULTS
        return ", ".join(f"{v[key]:g} {name}" for name, v in DEFAULTS.items())

    p = argparse.ArgumentParser(description="Train MF or LightGCN on a CoLLM dataset (BCE, early stop on valid AUC).")
    p.add_argument("--model", required=True, choices=sorted(MODELS), help="which collaborative model")
    p.add_argument("--data", default="ml-1m", help="dataset name under the data root, or a folder (default ml-1m)")
    p.add_argument("--data-root", default=None, help="folder holding datasets (default $COLLM_DATA, else ./data)")
    p.add_argument("--out", required=True, help="output folder for model.pt and metrics.json")
    p.add_argument("--dim", type=int, default=None, help=f"embedding size (default: {per_model('dim')})")
    p.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default: {per_model('lr')})")
    p.add_argument("--wd", type=float, default=None, help=f"Adam L2 weight decay (default: {per_model('wd')})")
    p.add_argument("--batch-size", type=int, default=1024, help="train rows per step (default 1024)")
    p.add_argument("--epochs", type=int, default=300, help="most epochs to train (default 300)")
    p.add_argument("--patience", type=int, default=50,
                   help="stop after this many epochs without a better valid AUC (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seeds the init (torch) and the shuffles (numpy)")
    p.add_argument("--layers", type=int, default=None,
                   help=f"LightGCN propagation layers (default {DEFAULTS['lightgcn']['layers']})")
    p.add_argument("--unseen", default="mean", choices=UNSEEN,
                   help="how to score a user or item with no train rows: 'mean' (default) uses the mean of the "
                        "trained rows (the average user); 'untouched' keeps its never-trained row, as the reference")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these ops are too small to gain from more)")
    a = p.parse_args(argv)
    problems = [f"--{k.replace('_', '-')} {v} must be > 0" for k, v in
                dict(dim=a.dim, lr=a.lr, batch_size=a.batch_size, epochs=a.epochs, patience=a.patience,
                     threads=a.threads).items()
                if v is not None and v <= 0]
    problems += [f"--{k} {v} must be >= 0" for k, v in dict(wd=a.wd, layers=a.layers).items()
                 if v is not None and v < 0]
    if a.layers is not None and a.model != "lightgcn":
        problems.append(f"--layers is for lightgcn only, not {a.model}")
    if problems:  # report every bad flag at once
        raise data.UsageError("; ".join(problems))
    ds = data.load_dataset(a.data, a.data_root)
    # These models do many tiny ops (a 1024 x 64 batch). On an idle 2-core machine one thread trained
    # MF faster than two (6.4 s vs 7.7 s); with other jobs on the cores, two threads spin-waiting on
    # each other were 5-25x slower. So one thread by default; results are the same either way.
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        model, metrics = train_rec(ds, a.model, dim=a.dim, lr=a.lr, wd=a.wd, batch_size=a.batch_size,
                                   epochs=a.epochs, patience=a.patience, seed=a.seed, layers=a.layers,
                                   unseen=a.unseen)
    finally:  # main() also runs inside other programs (tests): leave their thread count as it was
        torch.set_num_threads(threads)
    metrics["config"]["data"] = ds.name
    os.makedirs(a.out, exist_ok=True)
    ckpt_path = os.path.join(a.out, "model.pt")
    ckpt = {"model": a.model, "state_dict": model.state_dict(), "config": metrics["config"]}
    write_atomic(ckpt_path, lambda tmp: torch.save(ckpt, tmp))
    write_atomic(os.path.join(a.out, "metrics.json"), lambda tmp: write_json(metrics, tmp))
    m = metrics
    print(f"{a.model}: best epoch {m['best_epoch']}, valid AUC {m['valid']['auc']:.4f}, "
          f"test AUC {m['test']['auc']:.4f} UAUC {m['test']['uauc']:.4f} "
          f"(warm {m['test_warm']['auc']:.4f}, cold {m['test_cold']['auc']:.4f}), {m['seconds']:.1f}s -> {ckpt_path}")


if __name__ == "__main__":
    data.cli_main(main)
