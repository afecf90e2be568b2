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
