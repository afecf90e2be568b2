"""Tests for collab.py: MF and LightGCN learn a planted pattern, the LightGCN graph maths, checkpoints,
the CLI. All but the last run on a synthetic dataset built here, in seconds on a CPU."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import collab
import data
import eval as metrics  # our eval.py
from tools import results

from conftest import TOY_ITEMS, TOY_USERS, assert_error_line, run_python, toy_frames, write_dataset


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as collab.py's CLI uses: with these tiny ops, two threads on shared cores
    spin-wait and run 5-25x slower. Restored afterwards for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The planted pattern of conftest.toy_frames: every user and item has a hidden "taste angle"; a user
# likes an item iff the angles are less than 90 degrees apart. A low-rank pattern both models can
# learn, but no single epoch gets right (the liked-graph is connected, so its shape alone does not
# give the answer). Every (user, item) pair is rated once and assigned to a split at random.

USERS, ITEMS = TOY_USERS, TOY_ITEMS


@pytest.fixture(scope="module")
def toy(toy_root):
    """The toy dataset as every run reads it: data.load_dataset on its pickles (conftest.toy_root)."""
    return data.load_dataset("toy", str(toy_root))


def train_loss(model, split):
    with torch.no_grad():
        logits = model(torch.tensor(split.uid), torch.tensor(split.iid))
        return F.binary_cross_entropy_with_logits(logits, torch.tensor(split.label)).item()


# ---------------------------------------------------------------------------------------------
# Learning


@pytest.mark.parametrize("name", ["mf", "lightgcn"])
def test_learns_planted_pattern(toy, name):
    torch.manual_seed(0)  # train_rec seeds the same way before building, so this is its initial model
    tr = toy.splits["train"]
    edges = np.stack([tr.uid, tr.iid], 1)[tr.label == 1]
    start = collab.build_model(name, toy.user_num, toy.item_num, edges=edges, dim=16, layers=2)
    model, m = collab.train_rec(toy, name, dim=16, lr=1e-2, wd=0.0, batch_size=64, epochs=60, patience=60,
                                progress=False)
    assert train_loss(model, tr) < 0.7 * train_loss(start, tr)
    assert m["valid"]["auc"] > 0.8 and m["test"]["auc"] > 0.8
    assert set(m) == {"valid", "test", "test_warm", "test_cold", "best_epoch", "samples_seen", "seconds",
                      "config"}
    assert 1 <= m["best_epoch"] <= 60 and m["samples_seen"] == 60 * len(tr)  # patience 60: all 60 epochs ran


def test_same_seed_same_result(toy):
    runs = [collab.train_rec(toy, "lightgcn", dim=8, batch_size=64, epochs=5, seed=3, progress=False)[1]
            for _ in range(2)]
    assert runs[0]["valid"] == runs[1]["valid"] and runs[0]["best_epoch"] == runs[1]["best_epoch"]


# ---------------------------------------------------------------------------------------------
# Model maths


def test_normalized_adjacency_matches_dense():
    # 3 users (ids 1-3) and 3 items (ids 1-3); id 0 of each is padding, so n = 4 + 4 nodes.
    # The (1, 1) edge is listed twice and must count once.
    edges = [(1, 1), (1, 2), (2, 2), (3, 3), (1, 1)]
    A = np.zeros((8, 8))
    for u, i in set(edges):
        A[u, 4 + i] = A[4 + i, u] = 1
    deg = A.sum(1)
    d = np.where(deg > 0, deg, 1) ** -0.5 * (deg > 0)
    dense = d[:, None] * A * d[None, :]
    got = collab.normalized_adjacency(edges, 4, 4)
    assert got.is_sparse
    np.testing.assert_allclose(got.to_dense().numpy(), dense, rtol=1e-6)
    assert got.to_dense()[1, 4 + 2] == pytest.approx(1 / np.sqrt(2 * 2))  # user 1: 2 items; item 2: 2 users
    assert got.to_dense()[3, 4 + 3] == pytest.approx(1.0)                 # a lone pair: 1 / sqrt(1 * 1)
    assert torch.all(got.to_dense().diagonal() == 0)                       # no self loops


def test_lightgcn_propagation_and_shapes():
    edges = [(1, 1), (1, 2), (2, 2), (3, 3)]
    model = collab.LightGCN(4, 4, edges=edges, dim=5, layers=2)
    U, I = model.tables()
    assert U.shape == (4, 5) and I.shape == (4, 5) and model.dim == 5
    A = model.adj.to_dense()
    E0 = torch.cat([model.user.weight, model.item.weight])
    E = (E0 + A @ E0 + A @ A @ E0) / 3
    torch.testing.assert_close(torch.cat([U, I]), E)
    uid, iid = torch.tensor([1, 2, 3]), torch.tensor([2, 2, 1])
    torch.testing.assert_close(model(uid, iid), (E[uid] * E[4 + iid]).sum(-1))


def test_mf_tables_and_padding():
    model = collab.MF(7, 9, dim=6)
    U, I = model.tables()
    assert U.shape == (7, 6) and I.shape == (9, 6) and model.dim == 6
    assert torch.all(U[0] == 0) and torch.all(I[0] == 0)
    assert set(collab.MODELS) == {"mf", "lightgcn", "sasrec", "din", "pop"}


# ---------------------------------------------------------------------------------------------
# Ids with no train rows (collab.UNSEEN)


@pytest.mark.parametrize("name", ["mf", "lightgcn"])
def test_unseen_rows_read_the_mean_of_seen_rows(name):
    user_seen = np.array([False, True, True, False, True])  # users 0 (padding) and 3 have no train rows
    item_seen = np.array([False, True, True, True])
    edges = [(1, 1), (2, 2), (4, 3), (1, 3)]
    torch.manual_seed(0)
    plain = collab.build_model(name, 5, 4, edges=edges, dim=3, layers=2)                           # "untouched"
    torch.manual_seed(0)
    model = collab.build_model(name, 5, 4, (user_seen, item_seen), edges, dim=3, layers=2)  # "mean", same init
    (U0, I0), (U, I) = plain.tables(), model.tables()
    for i in (1, 2, 4):                       # trained rows: exactly what the plain model says
        torch.testing.assert_close(U[i], U0[i])
    mean = U0[[1, 2, 4]].mean(0)
    for i in (0, 3):                          # unseen rows: the mean of the trained rows, not their own
        torch.testing.assert_close(U[i], mean)
        assert not torch.allclose(U0[3], mean)
    torch.testing.assert_close(I[0], I0[1:].mean(0))
    torch.testing.assert_close(I[1:], I0[1:])
    uid, iid = torch.tensor([3, 1]), torch.tensor([2, 2])
    torch.testing.assert_close(model(uid, iid), (U[uid] * I[iid]).sum(-1))  # forward scores with them too
    # the masks are buffers: a checkpoint brings them back, and with them the same tables
    back = collab.rec_from_checkpoint(collab.rec_checkpoint(model), 5, 4)
    assert back.user_seen.tolist() == user_seen.tolist() and back.item_seen.tolist() == item_seen.tolist()
    for a, b in zip(model.tables(), back.tables()):
        torch.testing.assert_close(a, b)


def test_train_rec_marks_users_missing_from_train(toy):
    """Drop user 1's train rows: train_rec("mean") scores them as the average user, "untouched" with
    the row weight decay left behind."""
    tr = toy.splits["train"]
    keep = tr.uid != 1
    cut = data.Split(uid=tr.uid[keep], iid=tr.iid[keep], label=tr.label[keep], not_cold=tr.not_cold[keep],
                     his_ptr=np.zeros(keep.sum() + 1, np.int64), his_items=tr.his_items, warm=tr.warm[keep])
    ds = data.Dataset(name="toy", domain="movie", splits={**toy.splits, "train": cut}, titles=toy.titles,
                      user_num=toy.user_num, item_num=toy.item_num)
    user_seen, item_seen = collab.seen_in_train(ds)
    assert not user_seen[0] and not user_seen[1] and user_seen[2:].all() and item_seen[1:].all()
    assert collab.seen_in_train(ds, "untouched") is None
    kw = dict(dim=8, lr=1e-2, batch_size=64, epochs=3, progress=False)
    mean_model, m = collab.train_rec(ds, "mf", unseen="mean", **kw)
    plain_model, m0 = collab.train_rec(ds, "mf", unseen="untouched", **kw)
    assert m["config"]["unseen"] == "mean" and m0["config"]["unseen"] == "untouched"
    U, _ = mean_model.tables()
    torch.testing.assert_close(U[1], mean_model.user.weight[2:].mean(0))
    U0, _ = plain_model.tables()
    torch.testing.assert_close(U0[1], plain_model.user.weight[1])
    # the same seed trains the same rows either way: only the unseen user's table row differs
    torch.testing.assert_close(mean_model.user.weight[2:], plain_model.user.weight[2:])


# ---------------------------------------------------------------------------------------------
# Checkpoints and the CLI, on the toy data written as the authors' pickles (conftest's toy_root)


@pytest.mark.parametrize("name", ["mf", "lightgcn"])
def test_cli_roundtrip(toy_root, tmp_path, capsys, name):
    out = tmp_path / name
    collab.main(["--model", name, "--data", "toy", "--data-root", str(toy_root), "--out", str(out),
                 "--dim", "8", "--lr", "1e-2", "--batch-size", "64", "--epochs", "8", "--seed", "1", "--threads", "2"])
    assert torch.get_num_threads() == 1  # main() hands the caller's thread count back
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{name}: best epoch ") and line.endswith(f"-> {out / 'model.pt'}")
    assert sorted(os.listdir(out)) == ["metrics.json", "model.pt"]  # no temp files left behind

    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["model"] == name and ckpt["config"]["dim"] == 8 and ckpt["config"]["user_num"] == USERS + 1
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) == {"valid", "test", "test_warm", "test_cold", "best_epoch", "samples_seen", "seconds",
                      "config", "command"}
    assert m["command"] == f"python collab.py --model {name} --data toy --data-root {toy_root} --out {out} --dim 8 " \
                           f"--lr 1e-2 --batch-size 64 --epochs 8 --seed 1 --threads 2"
    assert set(m["test"]) == {"auc", "uauc", "uauc_users", "rows"}

    # the loaded model (no dataset needed) reproduces the reported valid AUC
    model = collab.load_rec(out / "model.pt", USERS + 1, ITEMS + 1)
    assert not model.training
    va = data.load_dataset("toy", str(toy_root)).splits["valid"]
    assert metrics.auc(va.label, collab.score(model, va)) == pytest.approx(m["valid"]["auc"])
    U, I = model.tables()
    assert U.shape == (USERS + 1, 8) and I.shape == (ITEMS + 1, 8)

    with pytest.raises(data.UsageError, match=f"{USERS + 1} users x {ITEMS + 1} items, expected 839 x 3256"):
        collab.load_rec(out / "model.pt", 839, 3256)


def test_evaluate_scores_a_saved_model_on_the_first_rows_of_a_split(toy_root, tmp_path, capsys):
    """collab.py --evaluate: the AUC of the first N rows, as train.py's --eval-rows slice is scored, equal
    to the AUC computed by hand from the model's own scores; the whole split's equals metrics.json's."""
    out = tmp_path / "mf"
    collab.main(["--model", "mf", "--data", "toy", "--data-root", str(toy_root), "--out", str(out), "--dim", "8",
                 "--lr", "1e-2", "--epochs", "3"])
    ds = data.load_dataset("toy", str(toy_root))
    model = collab.load_rec(out / "model.pt", USERS + 1, ITEMS + 1)
    va = ds.splits["valid"]
    n = len(va) // 3
    by_hand = metrics.auc(va.label[:n], collab.score(model, va)[:n])
    capsys.readouterr()
    res = collab.main(["--evaluate", str(out / "model.pt"), "--data", "toy", "--data-root", str(toy_root),
                       "--split", "valid", "--rows", str(n)])
    assert res["all"]["rows"] == n and res["all"]["auc"] == pytest.approx(by_hand)
    assert capsys.readouterr().out.strip().endswith(f"valid, {n:,} rows: AUC {by_hand:.4f} UAUC "
                                                    f"{res['all']['uauc']:.4f} ({res['all']['uauc_users']} users)")
    whole = collab.main(["--evaluate", str(out / "model.pt"), "--data", "toy", "--data-root", str(toy_root),
                         "--split", "valid"])
    assert whole["all"]["auc"] == pytest.approx(json.loads((out / "metrics.json").read_text())["valid"]["auc"])


def test_checkpoint_dict_roundtrip():
    """rec_checkpoint / rec_from_checkpoint: the form train.py embeds in its own checkpoints."""
    model = collab.LightGCN(4, 5, edges=[(1, 1), (1, 2), (2, 4), (3, 3)], dim=6, layers=3)
    back = collab.rec_from_checkpoint(collab.rec_checkpoint(model), 4, 5)
    assert isinstance(back, collab.LightGCN) and back.layers == 3 and not back.training
    for a, b in zip(model.tables(), back.tables()):
        torch.testing.assert_close(a, b)
    with pytest.raises(data.UsageError, match="expected 4 x 6"):
        collab.rec_from_checkpoint(collab.rec_checkpoint(model), 4, 6)


def test_model_pt_records_its_split_and_refuses_other_data(toy_root, tmp_path):
    """Table sizes alike, data not: the toy dataset of another seed has the same users and items."""
    other = tmp_path / "other"
    write_dataset(other, "toy", **toy_frames(seed=1))
    collab.main(["--model", "mf", "--data", "toy", "--data-root", str(other), "--out", str(tmp_path / "mf"),
                 "--dim", "4", "--epochs", "1"])
    here, there = (data.fingerprint(data.load_dataset("toy", str(r))) for r in (toy_root, other))
    path = tmp_path / "mf" / "model.pt"
    assert torch.load(path, weights_only=True)["config"]["data_fingerprint"] == there != here
    collab.load_rec(path, USERS + 1, ITEMS + 1, there)  # its own data: fine
    with pytest.raises(data.UsageError, match=f"model.pt: trained on another split .*{there}.*{here}"):
        collab.load_rec(path, USERS + 1, ITEMS + 1, here)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["data_fingerprint"]  # a model.pt that cannot say what it was trained on
    torch.save(ckpt, path)
    with pytest.raises(data.UsageError, match="model.pt: trained on another split .*fingerprint None"):
        collab.load_rec(path, USERS + 1, ITEMS + 1, here)


def test_load_rec_bad_files(tmp_path):
    with pytest.raises(data.UsageError, match="file not found"):
        collab.load_rec(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(data.UsageError, match="not a collab.py checkpoint"):
        collab.load_rec(tmp_path / "junk.pt")


def collab_cli(*args):
    """`python collab.py ARGS` -> (exit code, stderr), for assert_error_line."""
    res = run_python("collab.py", *args)
    return res.returncode, res.stderr


def test_cli_reports_every_bad_number_at_once(tmp_path):
    code, err = collab_cli("--model", "mf", "--out", str(tmp_path), "--dim", "0", "--lr", "-1", "--batch-size", "0",
                           "--epochs", "0")
    assert_error_line(code, err, "--dim", "--lr", "--batch-size", "--epochs")


@pytest.mark.parametrize("args, words, ours", [
    (["--model", "svd"], ["invalid choice: 'svd'"], False),   # argparse's own message, after its usage lines
    (["--model", "mf", "--data", "nope"], ["--data nope"], True),
    (["--model", "mf", "--unseen", "zero"], ["invalid choice: 'zero'"], False),
    (["--model", "pop", "--dropout", "0.5", "--lr", "1e-3"], ["--dropout is for", "--lr is for"], True),
], ids=["unknown model", "unknown dataset", "unknown --unseen", "flags of other models"])
def test_cli_bad_flags(tmp_path, args, words, ours):
    code, err = collab_cli(*args, "--out", str(tmp_path), "--data-root", str(tmp_path))
    if ours:
        assert_error_line(code, err, *words)
    else:
        assert code == 2 and "Traceback" not in err and all(w in err for w in words), err


# ---------------------------------------------------------------------------------------------
# Real data (skips without the released split)


def test_mf_real_data_learns(ml1m):
    _, m = collab.train_rec(ml1m, "mf", lr=1e-2, epochs=3, progress=False)
    assert m["valid"]["auc"] > 0.6
    assert m["config"]["user_num"] == 839 and m["config"]["item_num"] == 3256


def test_real_data_unseen_users(ml1m):
    """The numbers behind collab.UNSEEN: 42% of test rows and 35% of valid rows are users with no train row."""
    user_seen, item_seen = collab.seen_in_train(ml1m)
    te, va = ml1m.splits["test"], ml1m.splits["valid"]
    assert 1 - user_seen[te.uid].mean() == pytest.approx(0.424, abs=0.005)
    assert 1 - user_seen[va.uid].mean() == pytest.approx(0.354, abs=0.005)
    assert item_seen[te.iid].mean() > 0.98


# ---------------------------------------------------------------------------------------------
# SASRec, DIN, pop: the models that read the history (and the one that reads nothing personal).
# These run on the toy data loaded from its pickles, which carry the authors' histories: a user's
# earlier liked items, whose taste angles give the user's own away.


@pytest.mark.parametrize("name", ["sasrec", "din"])
def test_history_models_learn_planted_pattern(toy, name):
    tr = toy.splits["train"]
    torch.manual_seed(0)
    start = collab.build_model(name, toy.user_num, toy.item_num, dim=16, his_len=8, dropout=0.0)
    model, m = collab.train_rec(toy, name, dim=16, lr=1e-2, wd=0.0, dropout=0.0, batch_size=64, epochs=40,
                                patience=40, progress=False)
    loss = lambda mod: F.binary_cross_entropy_with_logits(torch.tensor(collab.score(mod.eval(), tr)),
                                                          torch.tensor(tr.label)).item()
    assert loss(model) < 0.7 * loss(start)
    assert m["valid"]["auc"] > 0.75 and m["test"]["auc"] > 0.75, (m["valid"], m["test"])
    assert m["config"]["his_len"] == collab.MODELS[name].defaults["his_len"]["movie"]


def test_pop_is_the_smoothed_positive_rate(toy):
    tr = toy.splits["train"]
    model, m = collab.train_rec(toy, "pop", prior=4.0, progress=False)
    g = tr.label.mean()
    i = tr.iid[0]
    rate = (tr.label[tr.iid == i].sum() + 4.0 * g) / ((tr.iid == i).sum() + 4.0)
    assert float(torch.sigmoid(model.logit[i])) == pytest.approx(rate, rel=1e-5)
    s = collab.score(model, toy.splits["test"])
    assert len(np.unique(s[toy.splits["test"].iid == i])) == 1  # the same score for every user
    assert m["valid"]["auc"] > 0.5 and m["samples_seen"] == len(tr) and model.dim == 0


def test_sasrec_is_causal_and_defined_on_empty_history():
    torch.manual_seed(0)
    model = collab.SASRec(5, 30, dim=8, his_len=6, dropout=0.0).eval()
    his = torch.tensor([[0, 0, 3, 7, 2, 9], [0, 0, 3, 7, 2, 9]])
    his[1, 4] = 11  # a later item changed: positions 0-3 must not notice, 4 and 5 must
    with torch.no_grad():
        out = model.encode(his)
    torch.testing.assert_close(out[0, :4], out[1, :4])
    assert not torch.allclose(out[0, 4], out[1, 4]) and not torch.allclose(out[0, 5], out[1, 5])
    with torch.no_grad():  # the last-position shortcut of scoring equals the full encoding
        torch.testing.assert_close(model.encode(his, last_only=True)[:, -1], out[:, -1])
        empty = model(torch.tensor([1, 2]), torch.tensor([3, 3]), torch.zeros(2, 6, dtype=torch.long))
    assert torch.isfinite(empty).all() and empty[0] == empty[1]  # one learned "no history yet" user


def test_din_weights_and_empty_history():
    torch.manual_seed(0)
    model = collab.DIN(5, 30, dim=8, his_len=4).eval()
    uid, iid = torch.tensor([1, 1]), torch.tensor([3, 3])
    his = torch.tensor([[0, 0, 0, 0], [0, 5, 6, 7]])
    with torch.no_grad():
        u, i = model.embed(uid, iid, his)
        logits = model(uid, iid, his)
    assert u.shape == (2, 24) and i.shape == (2, 24) and model.dim == 24
    assert torch.all(u[0, 8:16] == 0)                         # an empty history pools to zero
    torch.testing.assert_close(i[:, :8], i[:, 16:])           # item slot = the target embedding, three times
    torch.testing.assert_close(u[:, :8], i[:, :8])            # the merged vector starts with the target
    assert torch.isfinite(logits).all()
    with torch.no_grad():  # padding never counts, wherever it sits
        torch.testing.assert_close(model.embed(uid, iid, torch.tensor([[0, 5, 6, 7], [0, 0, 0, 0]]))[0][0], u[1])


def test_padded_history_right_aligned(toy):
    sp = toy.splits["train"]
    lens = np.diff(sp.his_ptr)
    r_long, r_empty = int(np.argmax(lens)), int(np.flatnonzero(lens == 0)[0])
    pad = data.padded_history(sp, 4, [r_long, r_empty])
    assert pad[0].tolist() == sp.history(r_long)[-4:].tolist() and pad[1].tolist() == [0, 0, 0, 0]
    short = int(np.flatnonzero(lens == 2)[0])
    assert data.padded_history(sp, 4, [short])[0].tolist() == [0, 0, *sp.history(short)]


@pytest.mark.parametrize("name", ["sasrec", "din", "pop"])
def test_new_models_cli_and_checkpoint_roundtrip(toy_root, tmp_path, capsys, name):
    out = tmp_path / name
    extra = [] if name == "pop" else ["--dim", "8", "--lr", "1e-2", "--epochs", "3"]
    collab.main(["--model", name, "--data", "toy", "--data-root", str(toy_root), "--out", str(out),
                 "--batch-size", "64", *extra])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"{name}: best epoch ")
    m = json.loads((out / "metrics.json").read_text())
    model = collab.load_rec(out / "model.pt", USERS + 1, ITEMS + 1)
    assert collab.model_name(model) == name and not model.training
    va = data.load_dataset("toy", str(toy_root)).splits["valid"]
    assert metrics.auc(va.label, collab.score(model, va)) == pytest.approx(m["valid"]["auc"])
    back = collab.rec_from_checkpoint(collab.rec_checkpoint(model), USERS + 1, ITEMS + 1)  # train.py's form
    np.testing.assert_allclose(collab.score(back, va), collab.score(model, va), rtol=1e-6)
    with pytest.raises(data.UsageError, match=f"{USERS + 1} users x {ITEMS + 1} items, expected 839 x 3256"):
        collab.load_rec(out / "model.pt", 839, 3256)


def test_history_id_beyond_the_item_table_is_one_error(toy):
    model = collab.SASRec(toy.user_num, 5, dim=4, his_len=3)  # a table of 5 items; toy histories go to 20
    with pytest.raises(data.UsageError, match="history item id .* beyond"):
        collab.score(model, toy.splits["valid"])


def test_frozen_tables_are_computed_once_until_the_weights_change():
    """CoLLM's frozen MF / LightGCN: one propagation for the whole run, not one per step."""
    model = collab.LightGCN(4, 4, edges=[(1, 1), (1, 2), (2, 2), (3, 3)], dim=5, layers=2)
    assert model.tables()[0] is not model.tables()[0]          # training: recomputed (gradients must flow)
    model.requires_grad_(False)
    first = model.tables()
    assert model.tables() is first                             # frozen: the same tensors
    with torch.no_grad():
        model.user.weight[1] += 1.0                            # an in-place change (load_state_dict is one)
    again = model.tables()
    assert again is not first and not torch.equal(again[0], first[0])
    torch.testing.assert_close(again[0], model.propagate()[0])


def test_results_table_knows_the_new_models(tmp_path):
    """tools/results.py --table: SASRec and DIN beside the paper's ML-1M numbers; pop has none ("-")."""
    block = {"auc": 0.7, "uauc": 0.6, "uauc_users": 3, "rows": 10}
    for name in ("sasrec", "din", "pop"):
        os.makedirs(tmp_path / name)
        m = {"valid": block, "test": block, "test_warm": block, "test_cold": block, "samples_seen": 5,
             "config": {"model": name, "data": "ml-1m"}}
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))
    rows = [results.result_row(tmp_path / n) for n in ("sasrec", "din", "pop")]
    lines = results.results_table(rows).splitlines()
    assert lines[2].startswith("| sasrec | SASRec | - | - |") and lines[2].endswith("| 0.7078 / 0.6884 |")
    assert lines[3].startswith("| din | DIN | - | - |") and lines[3].endswith("| 0.7166 / 0.6459 |")
    assert lines[4].startswith("| pop | Pop | - | - |") and lines[4].endswith("| - |")
    assert results.PAPER_ML1M["CoLLM-SASRec"] == (0.7235, 0.6990) and results.PAPER_ML1M["CoLLM-DIN"] == (0.7243, 0.6897)


def test_pop_and_din_on_real_data(ml1m):
    """pop is deterministic: the README's number exactly. DIN is above pop's valid AUC after one epoch."""
    _, m = collab.train_rec(ml1m, "pop", progress=False)
    assert m["test"]["auc"] == pytest.approx(0.7089, abs=5e-5) and m["test"]["uauc"] == pytest.approx(0.6786, abs=5e-5)
    _, m = collab.train_rec(ml1m, "din", epochs=1, progress=False)
    assert m["valid"]["auc"] > 0.69 and m["config"]["his_len"] == 10
