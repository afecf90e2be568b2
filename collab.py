"""collab.py: the collaborative models CoLLM borrows its user/item embeddings from (paper section 4.2).

Chapter three. Four recommenders of the paper's Table II and a popularity anchor, each trained alone
on the LLM's pointwise task (liked or not, binary cross-entropy on one logit per row), with Adam + L2
weight decay and early stopping on the FULL valid AUC:
  - MF: one learned vector per user and per item; score = their dot product.
  - LightGCN (He et al. 2020): the same vectors, first smoothed over the graph of train positives.
  - SASRec (Kang & McAuley 2018): no user table; a small causal transformer reads the row's history.
  - DIN (Zhou et al. 2018, the reference's `RecEncoder_DIN`): the history pooled with weights that depend
    on the target; an MLP scores [target, pooled history, user].
  - pop: each item's positive rate in train, nothing personal: what "no collaborative signal" scores.

What CoLLM (collm.py) asks of a model: `dim`, `his_len` (history items a batch must carry; 0 = none)
and `embed(uid, iid, his)` -> (user vector, item vector), (B, dim) each, for the prompt's two slots.
`load_rec` rebuilds a model from the checkpoint this script writes, without the dataset.

    python collab.py --model mf --data ml-1m --out runs/mf      # or lightgcn, sasrec, din
    python collab.py --model pop --data ml-1m --out runs/pop    # counts, no training loop
"""
import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import eval as metrics  # our eval.py, by what it holds (a plain `import eval` would hide the builtin)
from data import UsageError

# Each model class owns its `defaults` (constructor's and training's, TRAINING below): the best valid AUC
# of a small grid per model on ML-1M, unseen="mean" (docs/RESULTS.md; MF's are the reference's). Weight
# decay is the knob that matters (too strong: no learning; too weak: overfitting). Per-domain ones follow the data.
TRAINING = ("lr", "wd", "patience")  # the defaults train_rec reads; every other one goes to the constructor
INIT_STD = 0.1  # N(0, 0.1) init (LightGCN's); nn.Embedding's N(0, 1) makes d=256 dot products ~16 at step 0

# An id with no train rows gets no gradient from the data, only the weight decay's: the reference scores
# such a user with a near-zero vector of random direction, a coin flip per user. "mean" (our default)
# gives it the mean of the trained rows, the average user, the usual cold-start fallback (only the tables
# that scoring and CoLLM read change, no train step). "untouched" keeps the reference's behaviour (README).
UNSEEN = ("mean", "untouched")


def mean_for_unseen(table, seen):
    """(n, d) table with the rows where seen is False replaced by the mean of the seen rows."""
    return torch.where(seen[:, None], table, table[seen].mean(0))


def register_seen(model, user_num, item_num, seen):
    """Buffers user_seen / item_seen (one bool per id; checkpoints carry them); seen=None: every id seen."""
    user_seen, item_seen = seen if seen is not None else (np.ones(user_num, bool), np.ones(item_num, bool))
    model.register_buffer("user_seen", torch.as_tensor(user_seen, dtype=torch.bool))
    model.register_buffer("item_seen", torch.as_tensor(item_seen, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# Models. Each is a class with `name`, `defaults`, `dim`, `his_len`, `settings` (its constructor's
# arguments, for checkpoints), `embed`, forward(uid, iid, his) -> (B,) logits, and a line in MODELS.


def frozen_once(model, compute):
    """compute() -> (U, I), the whole tables of MF or LightGCN: recomputed per call while the weights train;
    while frozen (CoLLM's stage 2) the first result is reused, so LightGCN propagates once. Keyed on each
    weight's storage and version counter, which load_state_dict, in-place edits and .to(device) change."""
    weights = (model.user.weight, model.item.weight)
    if any(w.requires_grad for w in weights):
        return compute()
    key = tuple((w.data_ptr(), w._version) for w in weights)
    if getattr(model, "_frozen_key", None) != key:
        with torch.no_grad():
            model._frozen_tables = compute()
        model._frozen_key = key
    return model._frozen_tables


class MF(nn.Module):
    """Matrix factorisation: logit(u, i) = <U[u], I[i]>; CoLLM uses the tables (bar unseen rows)."""
    name, his_len = "MF", 0
    defaults = dict(dim=256, lr=1e-3, wd=1e-4, patience=50)

    def __init__(self, user_num, item_num, seen=None, edges=None, dim=256):
        super().__init__()
        self.dim, self.settings = dim, dict(dim=dim)
        self.user = nn.Embedding(user_num, dim, padding_idx=0)  # row 0 = padding, stays zero
        self.item = nn.Embedding(item_num, dim, padding_idx=0)
        for table in (self.user, self.item):
            nn.init.normal_(table.weight, std=INIT_STD)
            table.weight.data[0] = 0
        register_seen(self, user_num, item_num, seen)

    def tables(self):
        return frozen_once(self, lambda: (mean_for_unseen(self.user.weight, self.user_seen),
                                          mean_for_unseen(self.item.weight, self.item_seen)))

    def embed(self, uid, iid, his=None):
        U, I = self.tables()
        return U[uid], I[iid]  # (B, d) each

    def forward(self, uid, iid, his=None):
        u, i = self.embed(uid, iid, his)
        return (u * i).sum(-1)  # (B,)


def normalized_adjacency(edges, user_num, item_num):
    """A_hat = D^-1/2 A D^-1/2 of the user-item bipartite graph, a sparse (n, n) COO tensor. Nodes: users,
    then items offset by user_num; A: a 1 per distinct (user, item) edge, both ways, no self loops."""
    u, i = torch.as_tensor(edges, dtype=torch.long).reshape(-1, 2).unique(dim=0).T  # a repeat is one edge
    n = user_num + item_num
    rows = torch.cat([u, i + user_num])  # user -> item and item -> user
    cols = torch.cat([i + user_num, u])
    d_inv_sqrt = torch.bincount(rows, minlength=n).float().pow(-0.5)  # inf only on edgeless nodes, never read
    values = d_inv_sqrt[rows] * d_inv_sqrt[cols]
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, n), check_invariants=True).coalesce()


class LightGCN(nn.Module):
    """LightGCN: E = mean(E0, A_hat E0, ..., A_hat^L E0), split back into U and I; logit = <U[u], I[i]>.
    No weights or nonlinearities between layers: E0 are the only parameters. The checkpoint carries the graph."""
    name, his_len = "LightGCN", 0
    defaults = dict(dim=64, layers=2, lr=3e-3, wd=1e-5, patience=50)

    def __init__(self, user_num, item_num, seen=None, edges=None, dim=64, layers=2):
        super().__init__()
        self.dim, self.layers, self.user_num, self.item_num = dim, layers, user_num, item_num
        self.settings = dict(dim=dim, layers=layers)
        self.user = nn.Embedding(user_num, dim)
        self.item = nn.Embedding(item_num, dim)
        nn.init.normal_(self.user.weight, std=INIT_STD)
        nn.init.normal_(self.item.weight, std=INIT_STD)
        self.register_buffer("edges", torch.as_tensor(edges, dtype=torch.long).reshape(-1, 2))  # (E, 2)
        # Rebuilt from `edges` on load, so it stays out of the state_dict (persistent=False). CSR makes
        # A_hat @ E and its backward faster than COO; torch calls CSR "beta" (a warning).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            adj = normalized_adjacency(self.edges, user_num, item_num).to_sparse_csr()
        self.register_buffer("adj", adj, persistent=False)
        register_seen(self, user_num, item_num, seen)

    def propagate(self):
        E = torch.cat([self.user.weight, self.item.weight])  # (n, d), users then items
        layers = [E]
        for _ in range(self.layers):
            layers.append(torch.sparse.mm(self.adj, layers[-1]))  # (n, d): one hop of neighbour averaging
        E = torch.stack(layers).mean(0)  # (n, d): layer 0 keeps each node's own vector in the mix
        U, I = E.split([self.user_num, self.item_num])
        return mean_for_unseen(U, self.user_seen), mean_for_unseen(I, self.item_seen)

    def tables(self):
        return frozen_once(self, self.propagate)  # training: a full propagation per call

    # from here on LightGCN is MF on its propagated tables: the same lookup, the same dot product
    embed = MF.embed
    forward = MF.forward


class CausalBlock(nn.Module):
    """One SASRec block, one head, in the order of Kang & McAuley's code (the reference's; a GPT-2 style
    pre-norm block scored lower): attention of LayerNorm(x) over x, added to the normed query, a LayerNorm,
    the feed-forward with its residual. `allowed` (B, L, L): which key each query may read."""

    def __init__(self, dim, dropout):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-8), nn.LayerNorm(dim, eps=1e-8)
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim),
                                 nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, allowed, last_only=False):
        """x (B, L, d) -> (B, L, d); last_only: just the last position's, (B, 1, d), all SASRec's last block needs."""
        k, v = self.kv(x).chunk(2, -1)                                # (B, L, d) each
        if last_only:
            x, allowed = x[:, -1:], allowed[:, -1:]
        h = self.norm1(x)                                             # (B, L or 1, d)
        att = (self.q(h) @ k.transpose(1, 2)) / x.shape[-1] ** 0.5    # (B, L or 1, L)
        att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
        x = self.norm2(h + self.out(self.drop(att) @ v))
        return x + self.ffn(x)


class SASRec(nn.Module):
    """SASRec: the last his_len liked items (right-aligned, 0 = padding) as item embedding * sqrt(d) + a
    learned position embedding, through `blocks` causal blocks; the LAST position's output is the user
    vector (no user table: a new user is read like any other), dotted with the target's item embedding
    (one item table, as in SASRec). An empty history still has an output (each position reads itself):
    one learned "no history yet" vector, no NaN. It peaks within a few epochs, then only overfits, and an
    epoch costs many of MF's: patience 10. Dropout 0.2 is the paper's."""
    name = "SASRec"
    defaults = dict(dim=64, his_len={"movie": 25, "book": 20}, blocks=2, dropout=0.2, lr=3e-3, wd=1e-2, patience=10)

    def __init__(self, user_num, item_num, seen=None, edges=None, dim=64, his_len=25, blocks=2, dropout=0.2):
        super().__init__()
        self.dim, self.his_len = dim, his_len
        self.settings = dict(dim=dim, his_len=his_len, blocks=blocks, dropout=dropout)
        self.item = nn.Embedding(item_num, dim, padding_idx=0)
        nn.init.normal_(self.item.weight, std=INIT_STD)
        self.item.weight.data[0] = 0
        self.pos = nn.Embedding(his_len, dim)
        nn.init.normal_(self.pos.weight, std=INIT_STD)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(CausalBlock(dim, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)
        register_seen(self, user_num, item_num, seen)  # only item_seen is read: there is no user table

    def items(self):
        return mean_for_unseen(self.item.weight, self.item_seen)  # (n_items, d)

    def encode(self, his, last_only=False):
        """(B, L) history ids -> (B, L, d), position t having read items 0..t; last_only: (B, 1, d), the last."""
        L = his.shape[1]
        pad = his == 0                                                  # (B, L)
        x = self.items()[his] * self.dim ** 0.5 + self.pos.weight[-L:]  # (B, L, d)
        x = self.drop(x).masked_fill(pad[..., None], 0.0)               # padding carries nothing
        causal = torch.ones(L, L, dtype=torch.bool, device=his.device).tril()
        allowed = (causal & ~pad[:, None, :]) | torch.eye(L, dtype=torch.bool, device=his.device)  # (B, L, L)
        for k, block in enumerate(self.blocks):
            x = block(x, allowed, last_only and k == len(self.blocks) - 1)
        return self.norm(x)

    def embed(self, uid, iid, his):
        # A dislike does not extend the history, so many rows repeat an earlier row's: encode each once.
        distinct, row = torch.unique(his, dim=0, return_inverse=True)  # (G, L), (B,)
        return self.encode(distinct, last_only=True)[row, -1], self.items()[iid]  # (B, d) each

    forward = MF.forward  # the same dot product, with the history's user vector


class Dice(nn.Module):
    """DIN's activation on x (..., n): p = sigmoid(BatchNorm(x)), out = p * x + (1 - p) * alpha * x, a PReLU
    whose kink follows the batch; a one-row training batch uses the running statistics instead of failing."""

    def __init__(self, n):
        super().__init__()
        self.bn = nn.BatchNorm1d(n, eps=1e-8)
        self.alpha = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        bn = self.bn
        p = torch.sigmoid(F.batch_norm(flat, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                       self.training and len(flat) > 1, bn.momentum, bn.eps)).view_as(x)
        return p * x + (1 - p) * self.alpha * x


class DIN(nn.Module):
    """DIN: logit = MLP([target item, attention-pooled history, user]), three dim-wide tables (the
    reference's embedding_size 192 split in three). History item k weighs MLP([q, k, q-k, q*k]) for target
    q (hidden 64, 16, Dice after each, as in the DIN paper; the reference has none after 16), NOT
    softmax-normalised (the sum's size says how much of the history matches). For CoLLM: user slot =
    [q, pooled, u], item slot = [q, q, q], so one projector of width 3 * dim serves both (the reference's
    `all_encode` / `item_encoder`). Like SASRec it peaks within a few epochs: patience 10."""
    name = "DIN"
    defaults = dict(dim=64, his_len={"movie": 10, "book": 10}, dropout=0.0, lr=1e-3, wd=1e-4, patience=10)

    def __init__(self, user_num, item_num, seen=None, edges=None, dim=64, his_len=10, dropout=0.2):
        super().__init__()
        self.dim, self.his_len = 3 * dim, his_len  # `dim` = what CoLLM's projector receives
        self.settings = dict(dim=dim, his_len=his_len, dropout=dropout)
        self.user = nn.Embedding(user_num, dim)
        self.item = nn.Embedding(item_num, dim)
        self.his = nn.Embedding(item_num, dim, padding_idx=0)
        self.att = nn.Sequential(nn.Linear(4 * dim, 64), Dice(64), nn.Linear(64, 16), Dice(16), nn.Linear(16, 1))
        self.head = nn.Sequential(nn.Linear(3 * dim, 200), Dice(200), nn.Dropout(dropout),
                                  nn.Linear(200, 80), Dice(80), nn.Dropout(dropout), nn.Linear(80, 1))
        for m in self.modules():  # the reference's init: xavier-normal weights and tables, zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.xavier_normal_(m.weight)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        register_seen(self, user_num, item_num, seen)

    def embed(self, uid, iid, his):
        u = mean_for_unseen(self.user.weight, self.user_seen)[uid]           # (B, d)
        q = mean_for_unseen(self.item.weight, self.item_seen)[iid]           # (B, d)
        k = mean_for_unseen(self.his.weight, self.item_seen)[his]            # (B, L, d)
        q_ = q[:, None, :].expand_as(k)
        w = self.att(torch.cat([q_, k, q_ - k, q_ * k], -1)).squeeze(-1)     # (B, L) unnormalised
        pooled = (w.masked_fill(his == 0, 0.0)[..., None] * k).sum(1)       # (B, d)
        return torch.cat([q, pooled, u], -1), torch.cat([q, q, q], -1)       # (B, 3d) each

    def forward(self, uid, iid, his):
        return self.head(self.embed(uid, iid, his)[0]).squeeze(-1)  # (B,)


class Pop(nn.Module):
    """logit(u, i) = logit of item i's train positive rate shrunk towards the global rate: (positives_i
    + prior * global) / (rows_i + prior). The same for every user: the bar any personalised model has to
    clear (UAUC still ranks a user's items by how liked they are). No embeddings: not for CoLLM."""
    name, his_len, dim = "Pop", 0, 0
    defaults = dict(prior=3.0)

    def __init__(self, user_num, item_num, seen=None, edges=None, prior=3.0):
        super().__init__()
        self.settings, self.user_num, self.prior = dict(prior=prior), user_num, prior
        self.register_buffer("logit", torch.zeros(item_num))  # (n_items,) filled by fit()

    def fit(self, iid, label):
        pos = np.bincount(iid, weights=label, minlength=len(self.logit))
        rows = np.bincount(iid, minlength=len(self.logit))
        p = (pos + self.prior * label.mean()) / (rows + self.prior)
        self.logit.copy_(torch.as_tensor(np.log(p / (1 - p)), dtype=torch.float32))
        return self

    def forward(self, uid, iid, his=None):
        return self.logit[iid]  # (B,)


# The model table: --model / --rec NAME -> its class. Checkpoints, results tables and the CLI read it.
MODELS = {"mf": MF, "lightgcn": LightGCN, "sasrec": SASRec, "din": DIN, "pop": Pop}


def settings_for(name, domain="movie", **given):
    """A model's defaults (for `domain` where given per domain), the `given` ones not None in their place."""
    cfg = {k: v[domain] if isinstance(v, dict) else v for k, v in MODELS[name].defaults.items()}
    cfg.update({k: v for k, v in given.items() if v is not None and k in cfg})
    return cfg


def build_model(name, user_num, item_num, seen=None, edges=None, domain="movie", **given):
    """A fresh model `name`, its defaults replaced by `given` (which may hold a checkpoint's whole config)."""
    settings = {k: v for k, v in settings_for(name, domain, **given).items() if k not in TRAINING}
    return MODELS[name](user_num, item_num, seen=seen, edges=edges, **settings)


def model_name(model):
    """"mf", "lightgcn", ... for a model instance (the MODELS key of its class)."""
    return next(k for k, cls in MODELS.items() if type(model) is cls)


def train_graph(ds):
    """(E, 2) (user, item) pairs of the train positives: the graph LightGCN propagates over."""
    tr = ds.splits["train"]
    return np.stack([tr.uid, tr.iid], 1)[tr.label == 1]


def seen_in_train(ds, unseen="mean"):
    """(user_seen, item_seen): which ids have a train row; None for unseen="untouched" (each keeps its own)."""
    if unseen == "untouched":
        return None
    tr = ds.splits["train"]
    return (np.bincount(tr.uid, minlength=ds.user_num) > 0), (np.bincount(tr.iid, minlength=ds.item_num) > 0)


def new_rec(name, ds):
    """A freshly initialised model with the default settings (CoLLM's --tune-rec from scratch)."""
    return build_model(name, ds.user_num, ds.item_num, seen_in_train(ds), train_graph(ds), ds.domain)


def rec_checkpoint(model, run_settings=None):
    """The checkpoint dict of a collaborative model (model.pt, and the "rec" part of train.py's): config =
    table sizes + constructor settings (what rec_from_checkpoint needs) + the run's settings, if given."""
    cfg = dict(run_settings or {})
    cfg.update(user_num=model.user_num if isinstance(model, Pop) else model.user_seen.numel(),
               item_num=len(model.logit) if isinstance(model, Pop) else model.item_seen.numel(), **model.settings)
    return {"model": model_name(model), "config": cfg,
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}


def rec_from_checkpoint(ckpt, user_num=None, item_num=None, where="checkpoint"):
    """A model from a checkpoint dict, in eval mode; checks the table sizes if given."""
    try:
        name, cfg, state = ckpt["model"], ckpt["config"], ckpt["state_dict"]
        have = (cfg["user_num"], cfg["item_num"])
        settings = {k: v for k, v in cfg.items() if k not in ("user_num", "item_num")}
        model = build_model(name, *have, edges=state.get("edges"), **settings)
        model.load_state_dict(state)
    except Exception as e:  # a foreign checkpoint, a missing key, tables of other sizes: all mean "not ours"
        raise UsageError(f"{where}: not a collab.py checkpoint that fits its own settings "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    want = (user_num or have[0], item_num or have[1])
    if have != want:  # ids would index the wrong rows (or past the end) without a word
        raise UsageError(f"{where}: tables are {have[0]} users x {have[1]} items, expected "
                                 f"{want[0]} x {want[1]} (a model trained on another dataset?)")
    return model.eval()


def load_rec(path, user_num=None, item_num=None, fingerprint=None):
    """A model from a model.pt, in eval mode; checks table sizes and the data.fingerprint, if given."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found")
    except Exception as e:  # a truncated file, not a torch file
        raise UsageError(f"{path}: not a collab.py checkpoint ({type(e).__name__}: {e})")
    model = rec_from_checkpoint(ckpt, user_num, item_num, where=path)
    if fingerprint is not None:
        check_trained_on(ckpt["config"], fingerprint, path)
    return model


def model_in(path):
    """Which model a model.pt holds ("mf", "din", ...), or None where the file cannot tell (load_rec says why)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # every way a file can fail to load means "cannot tell" here
        return None
    return ckpt.get("model") if isinstance(ckpt, dict) and ckpt.get("model") in MODELS else None


def check_trained_on(cfg, fingerprint, path):
    """Same table sizes is not same data: refuse a model.pt whose data.fingerprint is another split's."""
    saved = cfg.get("data_fingerprint")
    if saved != fingerprint:
        raise UsageError(f"{path}: trained on another split (--data {cfg.get('data')}, fingerprint {saved}) "
                                 f"than this one (fingerprint {fingerprint}); train it on this data with collab.py")


# ---------------------------------------------------------------------------------------------
# Training: pointwise BCE, one shuffled pass over the train rows per epoch, keep the best valid AUC


def history(split, model, rows=None):
    """(N, his_len) padded history ids of a split's rows for a model that reads them, else None."""
    if not model.his_len:
        return None
    his = data.padded_history(split, model.his_len, rows)
    n_items = model.item_seen.numel()
    if his.size and his.max() >= n_items:  # an embedding lookup would fail with an IndexError traceback
        raise UsageError(f"history item id {his.max()} is beyond the model's item table ({n_items} items)")
    return torch.from_numpy(his)


@torch.no_grad()
def score(model, split, chunk=4096):
    """(N,) numpy logits of every row of a split, in chunks (SASRec's attention is (chunk, L, L))."""
    out = []
    for rows in np.array_split(np.arange(len(split)), max(1, -(-len(split) // chunk))):
        out.append(model(torch.from_numpy(split.uid[rows]), torch.from_numpy(split.iid[rows]),
                         history(split, model, rows)))
    return torch.cat(out).numpy()


def final_metrics(model, valid, test):
    """The metrics.json blocks of a trained model: the whole valid split, and test in full, warm, cold."""
    return metrics.metrics_block(metrics.report(valid, score(model, valid))["all"], metrics.report(test, score(model, test)))


def train_rec(ds, model_name, dim=None, lr=None, wd=None, batch_size=1024, epochs=300, patience=None,
              seed=0, layers=None, unseen="mean", progress=True, dropout=None, prior=None):
    """Train one model on ds (a data.Dataset) -> (model with the best-valid-AUC weights, metrics dict)."""
    cfg = settings_for(model_name, ds.domain, dim=dim, lr=lr, wd=wd, layers=layers, dropout=dropout, prior=prior,
                       patience=patience)
    settings = dict(cfg)  # the model's own, before the run's settings join them
    cfg.update(model=model_name, batch_size=batch_size, epochs=epochs, seed=seed, unseen=unseen,
               user_num=ds.user_num, item_num=ds.item_num)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)  # the epoch shuffles; torch's generator only draws the init
    tr, va, te = ds.splits["train"], ds.splits["valid"], ds.splits["test"]
    model = build_model(model_name, ds.user_num, ds.item_num, seen_in_train(ds, unseen), train_graph(ds), ds.domain,
                        **settings)
    start = time.time()
    if model_name == "pop":  # counted, not trained: one pass, nothing to stop early
        model.fit(tr.iid, tr.label).eval()
        result = final_metrics(model, va, te)
        result.update(best_epoch=1, samples_seen=len(tr), seconds=round(time.time() - start, 2), config=cfg)
        return model, result
    # Adam's weight_decay adds wd * w to the gradient: classic L2, as the paper's baselines use.
    # fused=True: one kernel for the whole update, much faster than the default on CPU.
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["wd"], fused=True)
    uid, iid, label = (torch.tensor(column) for column in (tr.uid, tr.iid, tr.label))  # copies: may be read-only arrays
    his = history(tr, model)  # (N, his_len) or None, padded once for the whole run
    # SASRec encodes each distinct history of a batch once: batches made of whole groups of rows
    # that share a history (shuffled groups, not rows) make that much less work.
    group = np.unique(his.numpy(), axis=0, return_inverse=True)[1].ravel() if model_name == "sasrec" else None
    steps = -(-len(tr) // batch_size)
    print(f"=> {model_name}: {ds.user_num} x {ds.item_num} tables, dim {model.dim}, {len(tr):,} train rows, "
          f"{steps} steps/epoch" + (f", {len(model.edges):,} graph edges" if model_name == "lightgcn" else "")
          + (f", last {model.his_len} history items" if model.his_len else ""))
    best_auc, best_epoch, best_state = -1.0, 0, None
    bar = tqdm(range(1, epochs + 1), desc=model_name, disable=not progress)
    for epoch in bar:
        model.train()
        losses = []
        order = rng.permutation(len(tr)) if group is None else \
            np.argsort(rng.permutation(group.max() + 1)[group], kind="stable")  # groups in random order
        for rows in np.array_split(order, steps):  # near-equal batches, none tiny
            rows = torch.from_numpy(rows)
            logits = model(uid[rows], iid[rows], his[rows] if his is not None else None)
            loss = F.binary_cross_entropy_with_logits(logits, label[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        valid_auc = metrics.auc(va.label, score(model.eval(), va))
        if valid_auc > best_auc:  # keep a copy of the best weights, not a file per epoch
            best_auc, best_epoch = valid_auc, epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        bar.set_postfix(loss=f"{np.mean(losses):.4f}", valid_auc=f"{valid_auc:.4f}", best=best_epoch)
        if epoch - best_epoch >= cfg["patience"]:  # no better valid AUC for `patience` epochs: stop
            break
    bar.close()
    model.load_state_dict(best_state)
    result = final_metrics(model.eval(), va, te)
    result.update(best_epoch=best_epoch, samples_seen=epoch * len(tr), seconds=round(time.time() - start, 2),
                  config=cfg)
    return model, result


def evaluate_main(argv):
    """python collab.py --evaluate MODEL.pt [--split S] [--rows N]: a trained model's AUC and UAUC on a split
    or its first N rows (as train.py's --eval-rows), to read a CoLLM run's valid curve against its model's."""
    p = argparse.ArgumentParser(description="Score a trained collaborative model (a model.pt of collab.py) on a split.")
    p.add_argument("--evaluate", required=True, metavar="MODEL_PT", help="the model.pt to score")
    data.add_data_flags(p)
    p.add_argument("--split", default="valid_small", choices=("valid_small", "valid", "test"),
                   help="split to score (default valid_small, the one train.py chooses LLM runs on)")
    p.add_argument("--rows", type=int, default=0, help="score only the first N rows (0 = all)")
    args = p.parse_args(argv)
    if args.rows < 0:
        raise UsageError(f"--rows {args.rows} must be >= 0 (0 = all)")
    ds = data.load_dataset(args.data, args.data_root)
    model = load_rec(args.evaluate, ds.user_num, ds.item_num, data.fingerprint(ds))
    split = ds.splits[args.split]
    rows = np.arange(len(split))[:args.rows or None]
    res = metrics.report(split, score(model, split)[rows], rows)
    a = res["all"]
    print(f"{model_name(model)} ({args.evaluate}) on {ds.name} {args.split}, {a['rows']:,} rows: AUC {a['auc']:.4f} "
          f"UAUC {a['uauc']:.4f} ({a['uauc_users']} users)")
    return res


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if any(a.split("=")[0] == "--evaluate" for a in argv):  # scoring a saved model, not training one
        return evaluate_main(argv)

    def per_model(key):  # "256 mf, 64 lightgcn, ...": the help text follows each model's defaults
        return ", ".join(f"{settings_for(name)[key]:g} {name}" for name, cls in MODELS.items() if key in cls.defaults)

    p = argparse.ArgumentParser(description="Train a collaborative model (MF, LightGCN, SASRec, DIN) or count the "
                                            "popularity baseline on a CoLLM dataset (BCE, early stop on valid AUC).")
    p.add_argument("--model", required=True, choices=sorted(MODELS), help="which collaborative model")
    data.add_data_flags(p)
    p.add_argument("--out", required=True, help="output folder for model.pt and metrics.json")
    p.add_argument("--dim", type=int, default=None, help=f"embedding size, for DIN of each of its three tables (default: {per_model('dim')})")
    p.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default: {per_model('lr')})")
    p.add_argument("--wd", type=float, default=None, help=f"Adam L2 weight decay (default: {per_model('wd')})")
    p.add_argument("--batch-size", type=int, default=1024, help="train rows per step (default 1024)")
    p.add_argument("--epochs", type=int, default=300, help="most epochs to train (default 300)")
    p.add_argument("--patience", type=int, default=None,
                   help=f"stop after this many epochs without a better valid AUC (default: {per_model('patience')})")
    p.add_argument("--seed", type=int, default=0, help="seeds the init (torch) and the shuffles (numpy)")
    p.add_argument("--layers", type=int, default=None,
                   help=f"LightGCN propagation layers (default: {per_model('layers')})")
    p.add_argument("--dropout", type=float, default=None,
                   help=f"SASRec / DIN dropout (default: {per_model('dropout')})")
    p.add_argument("--prior", type=float, default=None,
                   help=f"pop: pseudo-rows of the global rate added to each item's counts (default: {per_model('prior')})")
    p.add_argument("--unseen", default="mean", choices=UNSEEN,
                   help="how to score a user or item with no train rows: 'mean' (default) uses the mean of the "
                        "trained rows (the average user); 'untouched' keeps its never-trained row, as the reference")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these ops are too small to gain from more)")
    args = p.parse_args(argv)
    positive = dict(dim=args.dim, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, patience=args.patience,
                    threads=args.threads)
    problems = [f"--{k.replace('_', '-')} {v} must be > 0" for k, v in positive.items() if v is not None and v <= 0]
    problems += [f"--{k} {v} must be >= 0" for k, v in dict(wd=args.wd, layers=args.layers, prior=args.prior).items()
                 if v is not None and v < 0]
    if args.dropout is not None and not 0 <= args.dropout < 1:
        problems.append(f"--dropout {args.dropout} must be in [0, 1)")
    for flag in ("layers", "dropout", "prior", "dim", "lr", "wd", "patience"):  # a setting the model does not have
        if getattr(args, flag) is not None and flag not in MODELS[args.model].defaults:
            models = [name for name, cls in MODELS.items() if flag in cls.defaults]
            problems.append(f"--{flag} is for {' / '.join(models)} only, not {args.model}")
    if problems:  # report every bad flag at once
        raise UsageError("; ".join(problems))
    ds = data.load_dataset(args.data, args.data_root)
    # Many tiny ops (a 1024 x 64 batch): one thread beats two spin-waiting on each other; same results.
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        model, m = train_rec(ds, args.model, dim=args.dim, lr=args.lr, wd=args.wd, batch_size=args.batch_size,
                                  epochs=args.epochs, patience=args.patience, seed=args.seed, layers=args.layers,
                                  unseen=args.unseen, dropout=args.dropout, prior=args.prior)
    finally:  # main() also runs inside other programs (tests): leave their thread count as it was
        torch.set_num_threads(threads)
    m["config"].update(data=ds.name, data_fingerprint=data.fingerprint(ds))  # which split it learned
    m["command"] = " ".join(["python collab.py", *argv])  # tools/results.py --table --json puts it beside the numbers
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "model.pt")
    ckpt = rec_checkpoint(model, m["config"])  # config: every setting of the run, the table sizes first
    data.write_atomic(ckpt_path, lambda tmp: torch.save(ckpt, tmp))
    metrics.write_metrics(os.path.join(args.out, "metrics.json"), m)
    print(f"{args.model}: best epoch {m['best_epoch']}, valid AUC {m['valid']['auc']:.4f}, "
          f"test AUC {m['test']['auc']:.4f} UAUC {m['test']['uauc']:.4f} "
          f"(warm {m['test_warm']['auc']:.4f}, cold {m['test_cold']['auc']:.4f}), {m['seconds']:.1f}s -> {ckpt_path}")


if __name__ == "__main__":
    data.cli_main(main)
