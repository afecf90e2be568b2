"""Shared test fixtures and helpers, and the two tiers of the suite.

Tier 1, `python -m pytest -q -rs tests`: the sanity checks on tiny models built in code, the toy data
and the real tokenizers; minutes on a laptop CPU. Tier 2, `--real` added: also every test of the real
ML-1M split, SmolLM2-135M and the shipped checkpoints (the ones that take the `real_root` or `ml1m`
fixture). Real-data tests read the data root from $COLLM_DATA, else ./data (.ci/run points it at
../shared/data, and runs both tiers) and skip with a reason when the released split is not there."""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def _real_root():
    root = os.environ.get("COLLM_DATA", "data")
    ok = os.path.exists(os.path.join(root, "ml-1m.zip")) or os.path.exists(os.path.join(root, "ml-1m", "train_ood2.pkl"))
    return root if ok else None


TIER2_FIXTURES = {"real_root", "ml1m"}  # a test that takes one of these is in the second tier, and so is one
# marked @pytest.mark.tier2: a slow variant of a check that tier 1 makes in a cheaper form


def pytest_addoption(parser):
    parser.addoption("--real", action="store_true", help="also run the second tier: the real ML-1M split, "
                     "SmolLM2-135M and the shipped checkpoints (slower; .ci/run runs it)")


def pytest_configure(config):
    config.addinivalue_line("markers", "tier2: second tier, run with --real (a slow variant of a tier-1 check)")


def pytest_collection_modifyitems(config, items):
    """Without --real, each second-tier test is skipped with a reason that says how to run it."""
    if config.getoption("--real"):
        return
    skip = pytest.mark.skip(reason="second tier (real split, SmolLM2, shipped checkpoints): add --real to run it")
    for item in items:
        if TIER2_FIXTURES & set(getattr(item, "fixturenames", ())) or "tier2" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------------------------------------
# Running the toolkit as a user does, and reading its one-line errors


def run_python(*args, env=None, cwd=ROOT, timeout=300, input=None):
    """`python ARGS...` in a fresh process, from the repository root unless `cwd` -> CompletedProcess
    (text). `env` adds to this process's environment; a value of None removes that variable."""
    environ = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = str(value)
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=environ, input=input)


def assert_error_line(code, stderr, *words, alone=True):
    """How every CLI here reports bad input: exit status 2, no traceback, and a last stderr line
    `error: ...` naming each of `words`; `alone`: that line is all of stderr (CLIs that load models
    may warn before it)."""
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error:"), stderr[-3000:]
    if alone:
        assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert all(str(w) in lines[-1] for w in words), lines[-1]


@pytest.fixture(autouse=True)
def build_cache(tmp_path_factory, monkeypatch):
    """Splits built from raw files go to a fresh cache per test, never to ~/.cache/collm."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("COLLM_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def real_root():
    root = _real_root()
    if root is None:
        pytest.skip("the released ML-1M split (ml-1m.zip, or ml-1m/*_ood2.pkl) is not under $COLLM_DATA, else "
                    "./data; the README's Data section says how to get it")
    return root


@pytest.fixture(scope="session")
def ml1m(real_root):
    import data
    return data.load_dataset("ml-1m", real_root)


def shared_tokenizer(name):
    """The real LLaMA or Qwen2 tokenizer from ../shared/tokenizers, or skip."""
    path = os.path.join(SHARED, "tokenizers", name)
    if not os.path.isdir(path):
        pytest.skip(f"{path} not found (the real tokenizers live in ../shared/tokenizers)")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------
# A toy dataset in the authors' schema, for tests that need no ../shared. Every user and item has
# a hidden "taste angle"; a user likes an item iff the angles are less than 90 degrees apart: a
# low-rank pattern that a collaborative model learns and an LLM can partly read from the history.

TOY_USERS, TOY_ITEMS = 24, 20


def toy_frames(seed=0):
    rng = np.random.default_rng(seed)
    u, i = np.meshgrid(np.arange(1, TOY_USERS + 1), np.arange(1, TOY_ITEMS + 1), indexing="ij")
    u, i = u.ravel(), i.ravel()
    user_angle, item_angle = rng.uniform(0, 2 * np.pi, TOY_USERS + 1), rng.uniform(0, 2 * np.pi, TOY_ITEMS + 1)
    like = np.cos(user_angle[u] - item_angle[i]) > 0
    df = pd.DataFrame(dict(uid=u, iid=i, label=like.astype(int)))
    df["timestamp"] = rng.permutation(len(df))
    df["title"] = [f"Item {x}" for x in df.iid]
    df["flag"] = rng.choice([-1, 0, 1], size=len(df), p=[0.6, 0.2, 0.2])
    df = df.sort_values(["uid", "timestamp"]).reset_index(drop=True)
    his = []  # as the authors build them: [0] + earlier positives of the same user
    for _, g in df.groupby("uid", sort=False):
        seen = [0]
        for iid, label in zip(g.iid, g.label):
            his.append(list(seen))
            seen = seen + [iid] if label else seen
    df["his"] = his
    df["his_title"] = [[""] + [f"Item {x}" for x in h[1:]] for h in his]
    train = df[df.flag == -1]
    df["not_cold"] = [int(a in set(train.uid) and b in set(train.iid)) for a, b in zip(df.uid, df.iid)]
    parts = {"train": df[df.flag == -1], "valid": df[df.flag == 0], "test": df[df.flag == 1]}
    parts["valid_small"] = parts["valid"].sample(frac=0.5, random_state=2023)
    return parts


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A data root holding the toy dataset as `toy/{split}_ood2.pkl`."""
    root = tmp_path_factory.mktemp("data")
    write_dataset(root, "toy", **toy_frames())
    return root


# ---------------------------------------------------------------------------------------------
# A tiny dataset written by hand in the authors' schema, small enough to know every row: which are
# warm, which cold, what each history holds. write_dataset() writes it (or any frames, such as the
# toy dataset's above) as the authors' four pickles: the one way tests make a dataset on disk.

TINY_TITLES = {1: "Toy Story (1995)", 2: "Heat (1995)", 3: "Fargo (1996)", 4: "Godfather, The (1972)",
               5: "Jumanji (1995)", 6: "Life Is Beautiful (La Vita è bella) (1997)"}
# rows: (uid, iid, label, history item ids). Users 1, 2 and items 1, 4 are warm (4 train rows each,
# more than 3); item 5 is never a target, only in histories, so its title comes from his_title.
TRAIN = [(1, 1, 1, []), (1, 2, 0, [1]), (1, 3, 1, [1]), (1, 4, 1, [1, 3]),
         (2, 1, 1, []), (2, 2, 1, [1]), (2, 3, 0, [1, 2]), (2, 4, 1, [1, 2]),
         (3, 1, 0, []), (3, 4, 1, []), (4, 1, 1, [5]), (4, 4, 0, [5, 1])]
VALID = [(1, 6, 1, [1, 3, 4]), (2, 1, 0, [1, 2, 4]), (5, 2, 1, [])]
TEST = [(1, 1, 1, [1, 3, 4, 6]), (1, 4, 0, [1, 3, 4, 6, 1]), (2, 4, 1, [1, 2, 4]),  # warm
        (2, 2, 0, [1, 2, 4, 4]), (3, 1, 1, [4]),  # neither warm nor cold: item 2 / user 3 has few train rows
        (5, 1, 0, [2]), (1, 6, 1, [1, 3, 4, 6, 1]), (6, 6, 0, [])]  # cold: user 5, item 6, both unseen


def write_dataset(root, name="tiny", **frames):
    """The tiny dataset below as the authors' four pickles in root/name; `frames` replaces splits."""
    frames = {"train": frame(TRAIN), "valid": frame(VALID, 0), "test": frame(TEST, 1), **frames}
    frames.setdefault("valid_small", frames["valid"].sample(frac=0.5, random_state=2023))
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for s, df in frames.items():
        df.to_pickle(os.path.join(root, name, f"{s}_ood2.pkl"))
    return name


def frame(rows, flag=-1):
    """(uid, iid, label, liked item ids) rows -> a DataFrame in the authors' schema."""
    uid, iid, label, his = (list(c) for c in zip(*rows))
    seen_u, seen_i = {r[0] for r in TRAIN}, {r[1] for r in TRAIN}
    return pd.DataFrame(dict(
        uid=uid, iid=iid, label=label, timestamp=range(len(rows)), his=[[0] + h for h in his],
        his_title=[[""] + [TINY_TITLES[i] for i in h] for h in his], title=[TINY_TITLES[i] for i in iid],
        flag=float(flag), not_cold=[int(u in seen_u and i in seen_i) for u, i in zip(uid, iid)]))

