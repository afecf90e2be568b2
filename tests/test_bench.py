"""tools/bench.py end to end on the tiny LLM and the toy dataset: one step per path, so the script cannot
rot. No timing thresholds here (other jobs share these CPUs); the README records real numbers."""
import json

import pytest

from conftest import assert_error_line, run_python

KEYS = ("train_samples_per_s", "eval_samples_per_s", "train_peak_share", "eval_peak_share", "padding_share",
        "ref_padding_share", "speedup_train", "speedup_eval", "mem_ratio_train", "prefix_speedup_eval", "prefix_mem_eval",
        "prefix_tensors_eval", "catalog_speedup", "catalog_sample_prefixes", "retrieve_rerank_seconds", "device", "dtype", "cpu_capability",
        "cpu_bf16_units", "llm")


def bench(*args):
    return run_python("tools/bench.py", *args)


TINY = ["--llm", "tiny", "--dtype", "fp32", "--device", "cpu", "--batch-size", 2, "--steps", 1, "--warmup", 0,
        "--repeats", 1, "--matmul-size", 128, "--data", "toy", "--eval-rows", 12]


# The whole bench, as a user runs it: a child process per path, then the report. Second tier: tier 1
# runs each child path on its own (test_stage_two_paths_run_alone, test_catalog_alone).
@pytest.mark.tier2
@pytest.mark.parametrize("stage", ["lora", "cie"])
def test_one_tiny_step_per_path_ends_with_the_json_line(toy_root, stage):
    res = bench(*TINY, "--data-root", toy_root, "--stage", stage)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert set(KEYS) <= set(out), set(KEYS) - set(out)
    assert (out["device"], out["dtype"], out["llm"]) == ("cpu", "fp32", "tiny")
    for k in KEYS[:12] + ("catalog_speedup", "catalog_seconds", "catalog_rows"):
        assert out[k] > 0, (k, out[k])
    for k in ("prefix_speedup_train", "prefix_mem_train", "prefix_tensors_train"):
        assert (out[k] is None) is (stage == "lora"), k  # stage 1 has no prefix to skip
    for k in ("padding_share", "ref_padding_share"):
        assert 0 <= out[k] <= 1, (k, out[k])
    for label in ("train  ours", "train  reference", "eval   ours", "eval   whole prompt", "eval   reference"):  # the table, a row per path
        assert any(line.startswith(label) for line in lines), label


def test_catalog_alone(toy_root):
    """--only catalog: one user's candidates scored with the prefix once and plainly, rows/s of both."""
    res = bench(*TINY, "--data-root", toy_root, "--stage", "cie", "--only", "catalog")
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert (out["catalog_rows"], out["sample_rows"]) == (20, 12) and out["mean_rest_len"] < out["mean_len"]
    for k in ("catalog_speedup", "catalog_speedup_batched", "catalog_rows_per_s", "plain_rows_per_s", "catalog_seconds",
              "retrieve_rerank_seconds"):
        assert out[k] > 0, (k, out[k])
    assert out["retrieve_n"] == min(50, out["catalog_rows"])  # tools/use.py's default N
    assert out["sample_prefixes"] == 1 and len(out["load_average"].split()) == 3  # one user, one history


@pytest.mark.parametrize("path", ["ours-train", "whole-train", "ours-eval",  # the reference's paths: tier 2
                                  pytest.param("ref-train", marks=pytest.mark.tier2),
                                  pytest.param("ref-eval", marks=pytest.mark.tier2)])
def test_stage_two_paths_run_alone(toy_root, path):
    """--only runs one measurement (what each child process does); stage 2 splices the collaborative
    tokens into slots (ours: known positions; the reference's way: searched for)."""
    res = bench(*TINY, "--data-root", toy_root, "--stage", "cie", "--only", path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    rows = 2 if path.endswith("train") else 12  # a training step's batch; --eval-rows scored
    assert out["seconds"] > 0 and out["samples"] == rows and 0 < out["tokens"] <= out["padded"]
    assert out["mem_peak"] >= out["mem_base"] > 0 and out["mem_tensors"] > 0


def test_the_baseline_alone(toy_root):
    """--only baseline: the model alone on one fixed batch, and the machine's matmul peak."""
    res = bench(*TINY, "--data-root", toy_root, "--stage", "cie", "--only", "baseline")
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["train_seconds"] > 0 and out["eval_seconds"] > 0 and out["peak_flops"] > 0 and out["n_params"] > 0


def test_tensor_peak_counts_live_tensors_once():
    """TensorPeak: ten 1 MB tensors alive at once (and a view of each, no new memory) peak at 10 MB,
    even if each is freed before the next ten are made."""
    import torch
    from tools import bench
    def run_pass():
        for _ in range(3):
            held = [torch.ones(256, 1024) for _ in range(10)]   # 1 MiB of fp32 each
            views = [t[:, :10] for t in held]
            del held, views
    assert bench.tensor_peak(run_pass) == 10 * 2 ** 20


def test_bad_flags_are_one_clear_line():
    res = bench("--llm", "tiny", "--steps", 0, "--batch-size", 0)
    assert_error_line(res.returncode, res.stderr, "--steps", "--batch-size", alone=False)
