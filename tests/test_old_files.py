"""Files written before the code was split into today's chapters (prepare.py, backbone.py and
checkpoint.py did not exist yet) still load, resume and score. tests/fixtures/pre-chapters holds a
stage-1 and a stage-2 run of that code on the toy dataset, each paused halfway (best.pt, last.pt),
and what the same code printed when it finished them and scored them; make.sh says how they were made.
A checkpoint is a dict of tensors, numbers and strings (train.py saves no class of ours), so moving
code between files cannot break unpickling; these tests check that nothing else moved either."""
import json
import os
import platform
import shutil

import pytest
import torch

import backbone
import checkpoint
from conftest import ROOT, run_python, toy_frames, write_dataset

KEPT = os.path.join(ROOT, "tests", "fixtures", "pre-chapters")


def read_json(*path):
    with open(os.path.join(*path)) as f:
        return json.load(f)


def cpu_vendor():
    """GenuineIntel, AuthenticAMD, ...: MKL and oneDNN take other code paths on AMD than on Intel at
    the same capability (AVX512 on both), so fp32 results agree only to rounding across vendors."""
    try:
        with open(backbone.CPUINFO) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")),
                        platform.processor())
    except OSError:  # not Linux
        return platform.processor()


EXPECTED = read_json(KEPT, "expected.json")
# where the files were made (same torch, capability and vendor), the continuation must be the same bit for
# bit; elsewhere the kernels may round differently, and the metrics must agree to rounding
SAME_MACHINE = EXPECTED["made_with"] == {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
                                         "vendor": cpu_vendor()}


@pytest.fixture
def old_runs(tmp_path):
    """The kept runs in a fresh folder, beside the toy dataset at the relative path they recorded."""
    for name in ("lora", "cie", "mf"):
        shutil.copytree(os.path.join(KEPT, name), tmp_path / name)
    write_dataset(tmp_path / "toydata", "toy", **toy_frames())
    return tmp_path


@pytest.mark.parametrize("stage", ["lora", "cie"])
def test_old_checkpoints_load_with_their_digest(stage):
    last = checkpoint.load_checkpoint(os.path.join(KEPT, stage, "last.pt"), checkpoint.LAST_KEYS)
    best = checkpoint.load_checkpoint(os.path.join(KEPT, stage, "best.pt"), checkpoint.BEST_KEYS)
    assert "digest" in last and last["step"] == best["step"] == 4 and last["config"]["stage"] == stage
    assert ("rec" in best) == (stage == "cie")


@pytest.mark.parametrize("stage", ["lora", "cie"])
def test_an_old_paused_run_resumes_to_the_end_the_old_code_reached(old_runs, stage):
    res = run_python(os.path.join(ROOT, "train.py"), "--resume", stage, cwd=old_runs, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got, want = read_json(old_runs, stage, "metrics.json"), EXPECTED[stage]["finished"]
    assert got["best_step"] == want["best_step"]
    assert [h["step"] for h in got["history"]] == [h["step"] for h in want["history"]]
    if SAME_MACHINE:
        assert got["rank_digests"] == want["rank_digests"]  # the trained tensors, bit for bit
        assert (got["history"], got["loss_log"], got["test"]) == (want["history"], want["loss_log"], want["test"])
    else:
        assert [h["auc"] for h in got["history"]] == pytest.approx([h["auc"] for h in want["history"]], abs=1e-4)
        assert [x["loss"] for x in got["loss_log"]] == pytest.approx([x["loss"] for x in want["loss_log"]], abs=1e-4)


@pytest.mark.parametrize("stage", ["lora", "cie"])
def test_an_old_best_checkpoint_scores_as_the_old_code_scored_it(old_runs, stage):
    out = old_runs / "scored"
    res = run_python(os.path.join(ROOT, "train.py"), "--evaluate", "--ckpt", os.path.join(stage, "best.pt"),
                     "--split", "test", "--out", out, cwd=old_runs, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got, want = read_json(out, "metrics.json")["test"], EXPECTED[stage]["scored"]
    if SAME_MACHINE:
        assert got == want
    else:
        assert (got["auc"], got["uauc"]) == pytest.approx((want["auc"], want["uauc"]), abs=1e-4)
