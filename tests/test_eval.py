"""Tests for eval.py: AUC and UAUC against brute-force definitions, and the warm/cold report."""
import numpy as np
import pytest

import data
import eval as metrics  # our eval.py
from tools import results
from conftest import TEST, write_dataset


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
    assert metrics.auc(labels, scores) == pytest.approx(brute_auc(labels, scores), abs=1e-12)


@pytest.mark.parametrize("labels,scores,expected", [
    ([0, 1], [0.1, 0.9], 1.0),
    ([1, 0], [0.1, 0.9], 0.0),
    ([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5], 0.5),               # all tied
    ([1, 0, 1, 0], [0.8, 0.4, 0.4, 0.2], 3.5 / 4),           # one tied pair of four
    ([1, 1, 0, 0, 0], [3.0, 1.0, 2.0, 1.0, 0.0], 4.5 / 6),   # pos 3 beats all; pos 1 beats 0, ties 1
])
def test_auc_small_cases_by_hand(labels, scores, expected):
    assert metrics.auc(labels, scores) == pytest.approx(expected)


def test_auc_of_one_class_is_nan():
    assert np.isnan(metrics.auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert np.isnan(metrics.auc([0, 0], [0.1, 0.2]))


def test_uauc_matches_per_user_loop():
    rng = np.random.default_rng(0)
    users = rng.integers(1, 60, 800)
    labels = rng.integers(0, 2, 800)
    labels[users == 7] = 1                        # a one-class user: skipped
    users = np.append(users, [100, 101])          # two users with one row each: skipped
    labels = np.append(labels, [1, 0])
    scores = np.round(rng.normal(labels * 0.3, 1.0), 1)
    got, n = metrics.uauc(users, labels, scores)
    want, want_n = brute_uauc(users, labels, scores)
    assert got == pytest.approx(want, abs=1e-12) and n == want_n < len(np.unique(users)) - 3


def test_uauc_by_hand():
    # user 1: pos 0.9 > neg 0.1 -> 1; user 2: neg 0.8 > pos 0.2 -> 0; user 3: one class; user 4: one row
    got, n = metrics.uauc([1, 1, 2, 2, 3, 3, 4], [1, 0, 1, 0, 1, 1, 0], [0.9, 0.1, 0.2, 0.8, 0.5, 0.6, 0.3])
    assert (got, n) == (0.5, 2)
    got, n = metrics.uauc([1, 2], [1, 0], [0.5, 0.5])
    assert np.isnan(got) and n == 0


def test_report_warm_and_cold_subsets(tmp_path):
    test = data.load_dataset(write_dataset(tmp_path), tmp_path).splits["test"]
    # rows 0-2 warm, 5-7 cold (see TEST in conftest.py)
    scores = np.array([0.9, 0.3, 0.2, 0.6, 0.1, 0.4, 0.7, 0.5])
    rep = metrics.report(test, scores)
    assert {k: v["rows"] for k, v in rep.items()} == {"all": 8, "warm": 3, "cold": 3}
    # warm rows: user 1 (label 1 at 0.9, label 0 at 0.3), user 2 (label 1 at 0.2): AUC pairs 0.9>0.3, 0.2<0.3
    assert rep["warm"] == {"auc": 0.5, "uauc": 1.0, "uauc_users": 1, "rows": 3}
    labels = np.array([r[2] for r in TEST])
    assert rep["all"]["auc"] == pytest.approx(brute_auc(labels, scores))
    cold = np.array([5, 6, 7])
    assert rep["cold"]["auc"] == pytest.approx(brute_auc(labels[cold], scores[cold]))
    assert rep["cold"]["uauc_users"] == 0 and np.isnan(rep["cold"]["uauc"])  # one row per cold user
    assert metrics.report(test, scores[:3], rows=np.arange(3))["all"] == rep["warm"]  # scores of some rows only
    block = metrics.metrics_block(rep["all"], rep)
    assert block["test_warm"] is rep["warm"] and block["test_cold"] is rep["cold"] and block["valid"] is rep["all"]


# ---------------------------------------------------------------------------------------------
# Learning curves of finished runs (tools/results.py --plot): read from metrics.json alone


def fake_run(folder, history_steps=(2, 4), logged_steps=(1, 2, 3, 4), per_step=8):
    """A train.py run folder holding only what --plot reads: metrics.json."""
    import json
    folder.mkdir(parents=True)
    m = {"history": [{"step": s, "auc": 0.5 + s / 100} for s in history_steps],
         "loss_log": [{"step": s, "loss": 1.0 / s} for s in logged_steps],
         "samples_seen": history_steps[-1] * per_step, "samples_per_step": per_step,
         "config": {"eval_split": "valid_small"}}
    (folder / "metrics.json").write_text(json.dumps(m))
    return folder, m


def test_learning_curve_is_in_samples_seen(tmp_path):
    _, m = fake_run(tmp_path / "run")
    assert results.learning_curve(m, "run") == ([16, 32], [0.52, 0.54], [8, 16, 24, 32], [1.0, 0.5, 1 / 3, 0.25])
    del m["samples_per_step"]  # a run from before it was recorded: derived from the total
    assert results.learning_curve(m, "run")[0] == [16, 32]
    with pytest.raises(data.UsageError, match="no learning curve"):  # a collab.py run has no history
        results.learning_curve({"samples_seen": 10}, "mf/metrics.json")


def test_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional (tools/results.py --plot only)")
    runs = [fake_run(tmp_path / name)[0] for name in ("a", "b")]
    results.main(["--plot", *map(str, runs), "--out", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "curves.png"]  # no temporary file left


def test_plot_of_runs_without_a_loss_log_has_only_the_auc_panel(tmp_path):
    """Runs older than loss_log: no empty loss panel, the picture is the AUC panel alone (shorter)."""
    pytest.importorskip("matplotlib", reason="matplotlib is optional (tools/results.py --plot only)")
    heights = []
    for name, logged in (("with", (1, 2, 3, 4)), ("without", ())):
        run = fake_run(tmp_path / name, logged_steps=logged)[0]
        results.main(["--plot", str(run), "--out", str(tmp_path / f"{name}.png")])
        heights.append(int.from_bytes((tmp_path / f"{name}.png").read_bytes()[20:24], "big"))  # PNG header: height
    assert heights[1] < heights[0]


def test_plot_without_matplotlib_is_one_clear_error(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without it looks like to import
    run, _ = fake_run(tmp_path / "a")
    with pytest.raises(data.UsageError, match="--plot needs matplotlib.*pip install matplotlib"):
        results.main(["--plot", str(run), "--out", str(tmp_path / "curves.png")])


def test_curves_tabulate_each_scoring_with_the_best_in_bold(tmp_path, capsys):
    import json
    run, m = fake_run(tmp_path / "cie-x", history_steps=(125, 250, 375))
    for h, auc in zip(m["history"], (0.625, 0.9, 0.875)):  # the best scoring is the middle one, not the last
        h.update(auc=auc, rows=1000)
    m.update(stage="cie", config={"rec": "mf", "tune_rec": True, "rec_ckpt": "runs/mf/model.pt", "seed": 7},
             seconds=1234.5)
    (run / "metrics.json").write_text(json.dumps(m))
    results.main(["--curves", str(run)])
    row = capsys.readouterr().out.splitlines()[-1]
    assert row == ("| cie-x | CoLLM-MF | tune-rec | 7 | 1,000 | 125 / 250 / 375 | 0.6250 / **0.9000** / 0.8750 "
                   "| 0.9000 at 250 | 1,234 |")
    del m["seconds"]  # a run older than the wall-time and row-count records
    for h in m["history"]:
        del h["rows"]
    (run / "metrics.json").write_text(json.dumps(m))
    results.main(["--curves", str(run)])
    assert capsys.readouterr().out.splitlines()[-1] == ("| cie-x | CoLLM-MF | tune-rec | 7 | - | 125 / 250 / 375 | "
                                                        "0.6250 / **0.9000** / 0.8750 | 0.9000 at 250 | - |")
    (tmp_path / "mf").mkdir()
    (tmp_path / "mf" / "metrics.json").write_text(json.dumps({"config": {"model": "mf"}, "test": {}}))
    with pytest.raises(data.UsageError, match="--curves .*mf.*only train.py runs"):  # collab.py: no history
        results.main(["--curves", str(tmp_path / "mf")])


@pytest.mark.parametrize("args, words", [
    ([], ["--table RUN_DIR", "--curves", "tools/use.py --ckpt"]),
    (["--plot", "somewhere"], ["--plot needs --out"]),
    (["--table", "nowhere"], ["--table nowhere", "no metrics.json"]),
], ids=["nothing to do", "plot without --out", "no run there"])
def test_cli_bad_use_is_one_clear_line(args, words):
    with pytest.raises(data.UsageError) as e:
        results.main(args)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_recall_and_ndcg_at_k_by_hand():
    # liked items 3 and 9; ranked 3 first and 9 fourth: Recall@2 = 1/2, @4 = 2/2
    # NDCG@4 = (1/log2(2) + 1/log2(5)) / (1/log2(2) + 1/log2(3)) = (1 + 0.4307) / (1 + 0.6309)
    ranked = [3, 5, 7, 9, 1]
    assert metrics.recall_ndcg_at_k(ranked, {3, 9}, 2) == pytest.approx((0.5, 1 / (1 + 1 / np.log2(3))))
    assert metrics.recall_ndcg_at_k(ranked, {3, 9}, 4) == pytest.approx((1.0, (1 + 1 / np.log2(5)) / (1 + 1 / np.log2(3))))
    assert metrics.recall_ndcg_at_k(ranked, [9], 3) == (0.0, 0.0)  # ranked 4th: outside the top 3
    assert metrics.recall_ndcg_at_k(ranked, [5], 10) == pytest.approx((1.0, 1 / np.log2(3)))  # second: 1/log2(3)
