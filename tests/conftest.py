"""Shared test fixtures. Real-data tests read the data root from $COLLM_DATA (.ci/run points it at
../shared/data) and skip with a reason when the released split is not there."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def _real_root():
    root = os.environ.get("COLLM_DATA", "data")
    ok = os.path.exists(os.path.join(root, "ml-1m.zip")) or os.path.exists(os.path.join(root, "ml-1m", "train_ood2.pkl"))
    return root if ok else None


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
        pytest.skip("the released ML-1M split is not under $COLLM_DATA (set COLLM_DATA=../shared/data)")
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
    import numpy as np
    import pandas as pd
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
    os.makedirs(root / "toy")
    for s, df in toy_frames().items():
        df.to_pickle(root / "toy" / f"{s}_ood2.pkl")
    return root
