"""tools/bench.py: speed and memory of CoLLM training and scoring, against the machine's own matmul peak
and against the reference implementation's way of doing the same work.

The tool that measures the chapters. It answers three questions about one training stage:
  1. How close to the hardware do we get? Matmul FLOP/s achieved on real ML-1M batches, as a share
     of the device's peak for the dtype (a large square matmul, best of a few).
  2. Does the loop lose anything around the model? The same model on one fixed B x 190-token batch
     (no data, no loop: what the model alone can do) is the baseline the real batches should match.
  3. What do our choices buy over the reference? The same LLM + LoRA doing the same work the
     reference's way (the README's "What differs from the reference code"): full-vocabulary logits at every position,
     random batches padded to the longest row (and an attention mask for the pads), prompts
     re-built and re-tokenised from strings every step, and in stage 1 the collaborative model and
     projector run every step although nothing uses their output.

    python tools/bench.py --llm smollm2-135m --dtype bf16 --batch-size 8 --steps 5                 # stage 1
    python tools/bench.py --llm smollm2-135m --dtype bf16 --batch-size 8 --steps 5 --stage cie     # stage 2
    python tools/bench.py --llm smollm2-135m --dtype bf16 --batch-size 8 --steps 5 --device cuda
    python tools/bench.py --llm smollm2-135m --stage cie --only catalog --eval-rows 32 --repeats 1  # one user's catalog

A fourth, about using a trained model: how much faster is one user's whole catalog (tools/use.py
--user U --candidates unseen: the prompt up to the target title run once, then only each
candidate's own tokens) than plain scoring of the same rows? `--only catalog` answers it alone.

Each measurement runs in a child process of its own (`--only NAME` runs one and prints it as a JSON
line), so each path's peak memory is its own: on CPU the peak resident set size (reset after the
model and data are loaded, so it is the steps' peak with the weights resident, not the load's) and,
from one more untimed pass, the peak bytes of live tensors (TensorPeak); on CUDA
torch.cuda.max_memory_allocated. Times are wall clock on CPU, CUDA events on a GPU; each path
runs `--steps` batches after `--warmup` untimed ones, `--repeats` times, and the fastest pass counts.

FLOPs are counted, not profiled. Per REAL (non-pad) token a model with frozen weights does about
2N matmul FLOPs forward and 4N forward + backward (the backward computes the activations' gradients,
2N, but no gradients for frozen weights), where N = the matrix parameters of the decoder layers.
The embedding / LM head is left out of N: our forward computes one LM-head row, and crediting its
V x H parameters per token would count work we skip. The reference path is counted the same way,
so its padding and full-vocabulary logits show as lower useful FLOP/s. The last line printed is
one JSON object (keys in `summary`).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
import weakref
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the chapters, one folder up
import collab  # noqa: E402
import collm  # noqa: E402
import data  # noqa: E402
import eval as metrics  # noqa: E402  (our eval.py)
import train  # noqa: E402
from data import UsageError  # noqa: E402
from tools import use  # noqa: E402

CHILDREN = ("baseline", "ours-train", "whole-train", "ours-eval", "whole-eval", "ref-train", "ref-eval", "catalog")
FIXED_LEN = 190  # tokens per row of the fixed-shape baseline: the mean ML-1M prompt in LLaMA tokens


# ---------------------------------------------------------------------------------------------
# Settings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Speed and memory of CoLLM training and scoring: share of the "
                                            "device's matmul peak, and ours against the reference's way.")
    p.add_argument("--llm", default="smollm2-135m", help="smollm2-135m | gemma3-270m | tiny | tiny-gemma3 | a model folder | a hub id")
    p.add_argument("--stage", default="lora", choices=("lora", "cie"),
                   help="lora: stage 1, LoRA on text prompts; cie: stage 2, projector on CoLLM prompts (default lora)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="compute dtype, as train.py --dtype (default auto: bf16 on GPUs and on CPUs with bf16 "
                        "units, fp32 on other CPUs); the peak and the shares are for the dtype used")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda if available")
    p.add_argument("--batch-size", type=int, default=8, help="training rows per step (default 8, train.py's)")
    p.add_argument("--eval-batch-size", type=int, default=0,
                   help="scoring rows per batch (0 = twice --batch-size, as train.py scores)")
    p.add_argument("--steps", type=int, default=5, help="timed batches per pass (default 5)")
    p.add_argument("--eval-rows", type=int, default=256,
                   help="scoring paths score the first N test rows in split order (default 256)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first (kernel choice, page faults; default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes; the fastest counts (default 3)")
    p.add_argument("--matmul-size", type=int, default=4096, help="n of the n x n x n peak matmul (default 4096)")
    p.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="our path with activation checkpointing (train.py --grad-checkpoint): run with and "
                        "without to see what it costs in samples/s and saves in peak memory; default off")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="our path with torch.compile'd decoder layers (collm.compile_decoder); default off")
    data.add_data_flags(p)
    p.add_argument("--cache-dir", default="cache", help="where converted models are kept (as train.py)")
    p.add_argument("--seed", type=int, default=2023, help="seeds the LoRA init and which batches are drawn")
    p.add_argument("--only", default=None, choices=CHILDREN,
                   help="run one measurement in this process and print it as one JSON line (what the "
                        "parent runs in each child process; useful alone to profile one path)")
    args = p.parse_args(argv)
    problems = [f"--{k.replace('_', '-')} must be >= 1 (got {v})" for k, v in
                dict(batch_size=args.batch_size, steps=args.steps, repeats=args.repeats, matmul_size=args.matmul_size,
                     eval_rows=args.eval_rows).items()
                if v < 1]
    problems += [f"--{k.replace('_', '-')} must be >= 0 (got {v})" for k, v in
                 dict(eval_batch_size=args.eval_batch_size, warmup=args.warmup).items() if v < 0]
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA device is visible")
    if args.dtype == "fp16" and args.device != "cuda" and not torch.cuda.is_available():
        problems.append("--dtype fp16 is a GPU dtype (CPU matmuls have no fp16 units); use bf16 on CPU")
    if problems:
        raise UsageError("; ".join(problems))
    args.eval_batch_size = args.eval_batch_size or 2 * args.batch_size
    return args


def device_and_dtype(args):
    """-> (device, dtype (None = fp32), dtype name, why that dtype), chosen as train.py chooses."""
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    return (device, *train.compute_dtype(args.dtype, device))


# ---------------------------------------------------------------------------------------------
# Clocks and memory gauges: CUDA events and allocator statistics on a GPU, wall time and the
# resident set size on CPU


def clock(device, fn):
    """-> seconds that fn() took. CUDA runs kernels asynchronously: time between two events, after
    a synchronize, so the GPU's work is counted and not just the Python that queued it."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _proc_status(key):
    """A /proc/self/status field in bytes (Linux), or None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def memory_now(device):
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status("VmRSS") or 0


def reset_peak_memory(device):
    """Start counting the peak from here (after loading: a load can briefly hold two copies of the
    weights, and that is not what a training step costs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the high-water mark VmHWM to the current RSS
    except OSError:
        pass  # elsewhere the peak below is the whole process's, load included


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = _proc_status("VmHWM")
    if hwm is not None:
        return hwm
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024  # bytes on macOS, kB on Linux


class TensorPeak(TorchDispatchMode):
    """The CPU's counterpart of torch.cuda.max_memory_allocated: the most bytes held at once by the
    tensors that ops create while it is active (each counted from the op that made it until its
    storage is freed). A process's peak RSS also holds what the libraries keep per shape (oneDNN's
    kernel caches, the allocator's free lists) and repeats to only +-0.06 GB between identical runs
    here, coarser than the gap between two scoring paths; this count repeats to the byte. It sees
    every op, so it runs one untimed eager pass of its own."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.held = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        """Run the op; count each new CPU storage among its outputs until it is freed."""
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.held and storage.nbytes():  # a view of a counted tensor is not new memory
                    self.held.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self.release, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out

    def release(self, key, nbytes):
        self.held.discard(key)
        self.live -= nbytes


def tensor_peak(run_pass):
    """-> the bytes TensorPeak counts over one eager run_pass() (compiled layers run eager meanwhile)."""
    with torch.compiler.set_stance("force_eager"), TensorPeak() as gauge:
        run_pass()
    return gauge.peak


def timed_passes(device, args, run_pass):
    """Run `run_pass` (the warm-up already done) `--repeats` times -> (fastest seconds, all of them)."""
    times = [clock(device, run_pass) for _ in range(args.repeats)]
    return min(times), times


def measure(device, args, warm_up, run_pass):
    """warm_up() once, then the timed passes -> dict(seconds, times, mem_base, mem_peak, mem_tensors).

    mem_base is the memory once the model and data are loaded; the peak counts from after the warm-up
    (its one-off costs: kernel choice, compiling; what a training step holds stays resident).
    mem_tensors (CPU): TensorPeak over one more, untimed pass (on CUDA, mem_peak is already that count)."""
    base = memory_now(device)
    warm_up()
    reset_peak_memory(device)
    best, times = timed_passes(device, args, run_pass)
    peak = peak_memory(device)
    tensors = tensor_peak(run_pass) if device.type == "cpu" else peak - base
    return dict(seconds=best, times=times, mem_base=base, mem_peak=peak, mem_tensors=tensors)


# ---------------------------------------------------------------------------------------------
# The device's peak: what one large matmul reaches (the ceiling for a model that is all matmuls)


def matmul_peak(device, dtype, n, repeats=5):
    """-> FLOP/s of the best of `repeats` n x n @ n x n matmuls in `dtype`."""
    x = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    y = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    x @ y  # the first call picks kernels and faults the output pages in
    return 2 * n ** 3 / min(clock(device, lambda: x @ y) for _ in range(repeats))


# ---------------------------------------------------------------------------------------------
# Models. Both paths use train.py's LLM + LoRA; stage 2 adds a collaborative model and projector.


def decoder_matrix_params(model):
    """N: parameters of the decoder layers' weight matrices (the matmuls every token goes through);
    LoRA's rank-8 matrices are left out (0.4% of the work on SmolLM2) and so are the embeddings."""
    layers = model.llm.get_base_model().get_decoder().layers
    return sum(p.numel() for name, p in layers.named_parameters() if p.ndim == 2 and "lora_" not in name)


def build(args, ds, dtype, device, with_rec, ours=True):
    """-> (CoLLM, tokenizer, cfg) with this stage's trainable tensors.

    Stage 1 is train.build_model's model as it is. Stage 2 (and the reference's stage 1, which runs
    a collaborative model it never uses) adds a fresh MF with its projector: trained or random
    weights cost the same time, and this way the bench needs no checkpoints. `--compile` applies to
    our path (and its fixed-batch baseline) only: the reference ran eager."""
    cfg = train.Config(stage=args.stage, llm=args.llm, data=args.data, data_root=args.data_root, cache_dir=args.cache_dir,
                       dtype=args.dtype, seed=args.seed, batch_size=args.batch_size, grad_checkpoint=args.grad_checkpoint and ours)
    torch.manual_seed(args.seed)
    model, tok = train.build_model(replace(cfg, stage="lora"), ds, dtype)  # lora: needs no --ckpt
    if with_rec:
        model = collm.CoLLM(model.llm, model.yes_id, collab.MF(ds.user_num, ds.item_num))
        collm.set_trainable(model, args.stage)  # what train.py trains in this stage (collm.STAGES)
    if args.compile and ours:
        collm.compile_decoder(model)
    return model.to(device), tok, cfg


def train_step_fn(model, device, dtype, score_fn):
    """-> step(batch): one optimizer step exactly as train.py takes it (autocast, BCE on the Yes
    logit, loss scaling for fp16, clipping, train.py's AdamW with its default settings),
    `score_fn(batch)` giving the (B,) logits."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = train.build_optimizer(trainable, train.Config())
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(batch):
        """One optimizer step on `batch`, as train.train_step takes it (autocast, scaler, clip)."""
        with train.autocast(device, dtype):
            loss = F.binary_cross_entropy_with_logits(score_fn(batch), batch["label"].to(device))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # the loop reads the loss every step (on CUDA, a wait for the GPU)
    return step


def padded_tokens(lengths, batches):
    """-> (real tokens, tokens including pads) of right-padded batches of rows with these lengths."""
    return int(sum(lengths[b].sum() for b in batches)), int(sum(len(b) * lengths[b].max() for b in batches))


# ---------------------------------------------------------------------------------------------
# Our path: prompts tokenised once (data.encode_split), length-bucketed batches, one LM-head row


def ours_train(args, ds, device, dtype, prefix_cache=True):
    """prefix_cache=False: the same steps with the whole prompt in one decoder call ("whole-train";
    stage 2 only, as stage 1 always runs in one call)."""
    model, tok, cfg = build(args, ds, dtype, device, with_rec=collm.STAGES[args.stage]["rec"])
    model.prefix_cache = prefix_cache
    enc = collm.encode(cfg, ds, tok, "train", model)
    split, pad = ds.splits["train"], data.SegmentTokenizer(tok).pad_id
    epoch = data.train_batches(enc.lengths, args.batch_size, np.random.default_rng(args.seed), bucket=True)
    batches = epoch[:args.warmup + args.steps]
    step = train_step_fn(model, device, dtype, lambda batch: model(**batch))
    model.train()

    def run(rows_list):
        for rows in rows_list:  # collating is part of the step, as in train.py's loop
            step({k: v.to(device) for k, v in data.collate(enc, split, rows, pad).items()})

    m = measure(device, args, lambda: run(batches[:args.warmup]), lambda: run(batches[args.warmup:]))
    real, total = padded_tokens(enc.lengths, batches[args.warmup:])
    # Padding over a whole epoch, for both batchings of the same prompts (the reference's prompts
    # tokenise to these lengths too: data.py's tests check segment-wise == whole-string tokenising).
    random_epoch = data.train_batches(enc.lengths, args.batch_size, np.random.default_rng(args.seed), bucket=False)
    share = lambda bs: 1 - np.divide(*padded_tokens(enc.lengths, bs))
    return dict(**m, samples=args.steps * args.batch_size, tokens=real, padded=total, n_params=decoder_matrix_params(model),
                n_embed=model.llm.get_input_embeddings().weight.numel(), padding_epoch=share(epoch),
                ref_padding_epoch=share(random_epoch), mean_len=float(enc.lengths.mean()))


def eval_rows(args, ds):
    """The rows every scoring path scores: the first --eval-rows rows of the test split, in the
    split's order (one user's rows side by side, as a split is stored), the same for all paths."""
    return np.arange(min(args.eval_rows, len(ds.splits["test"])))


def ours_eval(args, ds, device, dtype, prefix_cache=True):
    """eval.score_rows itself over eval_rows(); prefix_cache=False ("whole-eval") scores every row's
    whole prompt in one decoder call, in length order, as before shared prefixes."""
    model, tok, cfg = build(args, ds, dtype, device, with_rec=collm.STAGES[args.stage]["rec"])
    model.prefix_cache = prefix_cache
    enc = collm.encode(cfg, ds, tok, "test", model)
    split, pad, batch_size, rows = ds.splits["test"], data.SegmentTokenizer(tok).pad_id, args.eval_batch_size, eval_rows(args, ds)
    score = lambda rs: metrics.score_rows(model, enc, split, rs, batch_size, pad, device, dtype)
    m = measure(device, args, lambda: score(rows[:batch_size]), lambda: score(rows))
    groups = data.prefix_groups(enc, rows) if prefix_cache else None
    batches = data.eval_batches(enc.lengths[rows], batch_size, enc.shared[rows], groups)
    real, total = padded_tokens(enc.lengths[rows], batches)
    return dict(**m, samples=len(rows), tokens=real, padded=total, mean_len=float(enc.lengths[rows].mean()),
                prefixes=len(set(data.prefix_groups(enc, rows))), shared_share=float(enc.shared[rows].sum() / real))


# ---------------------------------------------------------------------------------------------
# The reference's way: the same LLM + LoRA, but prompts built as strings and tokenised every step,
# random batches padded to the longest with an attention mask, logits for the whole vocabulary at
# every position, and (stage 1) the collaborative model + projector run for nothing


class ReferencePrompts:
    """Builds a batch the way the reference's Dataset + collator do, every step: text per row, one
    tokenizer call over the batch (padding to its longest row), slots found by searching for the
    placeholder token."""

    def __init__(self, ds, tok, stage):
        self.ds, self.tok = ds, tok
        self.template = data.load_template(ds.domain, collm.STAGES[stage]["template"])
        self.bos = tok.bos_token or ""  # the reference typed "<s>" before every prompt
        self.slot = tok.unk_token or tok.eos_token  # the reference's placeholder: <unk>, found by its id
        self.slot_id = tok.convert_tokens_to_ids(self.slot)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"

    def __call__(self, split, rows):
        texts = []
        for r in rows:
            hist = [self.ds.titles[i] for i in split.history(r)]
            text = data.render_prompt(data.prompt_segments(self.template, hist, self.ds.titles[split.iid[r]]))
            texts.append(self.bos + text.replace("<UserID>", self.slot).replace("<TargetItemID>", self.slot))
        t = self.tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        return dict(input_ids=t["input_ids"], attention_mask=t["attention_mask"], uid=torch.from_numpy(split.uid[rows]),
                    iid=torch.from_numpy(split.iid[rows]), label=torch.from_numpy(split.label[rows]))


def reference_scores(model, batch, stage, slot_id):
    """(B,) Yes-logits the reference's way. `model` is a CoLLM with a rec model in both stages."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = torch.arange(len(ids), device=ids.device)
    u, i = model.collab_tokens(batch["uid"], batch["iid"])  # stage 1 computes these too, then drops them
    if collm.STAGES[stage]["rec"]:  # stage 2: the slots are filled
        embed = model.llm.get_input_embeddings()(ids)  # (B, T, H)
        where = (ids == slot_id).nonzero()  # (2B, 2) the placeholder positions, searched for
        if len(where) != 2 * len(ids):
            raise UsageError(f"reference path: expected 2 placeholder tokens per prompt, found {len(where)} "
                             f"in {len(ids)} prompts")
        embed = embed.index_put((where[0::2, 0], where[0::2, 1]), u.to(embed.dtype))
        embed = embed.index_put((where[1::2, 0], where[1::2, 1]), i.to(embed.dtype))
        logits = model.llm(inputs_embeds=embed, attention_mask=mask).logits  # (B, T, V): every position
    else:
        logits = model.llm(input_ids=ids, attention_mask=mask).logits  # (B, T, V): every position
    return logits[rows, mask.sum(1) - 1, model.yes_id].float()


def ref_train(args, ds, device, dtype):
    """The reference's training step on the same rows: every prompt tokenised again each step, padded
    with an attention mask, and the whole vocabulary's logits computed (reference_scores)."""
    model, tok, cfg = build(args, ds, dtype, device, with_rec=True, ours=False)
    prompts, split = ReferencePrompts(ds, tok, args.stage), ds.splits["train"]
    lengths = np.diff(split.his_ptr)  # only to size the draw; the batches are random, as the reference's
    batches = data.train_batches(lengths, args.batch_size, np.random.default_rng(args.seed), bucket=False)[:args.warmup + args.steps]
    step = train_step_fn(model, device, dtype, lambda batch: reference_scores(model, batch, args.stage, prompts.slot_id))
    model.train()
    counts = []

    def run(rows_list):
        for rows in rows_list:
            batch = {k: v.to(device) for k, v in prompts(split, rows).items()}  # tokenised again every step
            counts.append((int(batch["attention_mask"].sum()), batch["attention_mask"].numel()))
            step(batch)

    m = measure(device, args, lambda: run(batches[:args.warmup]), lambda: run(batches[args.warmup:]))
    real, total = np.sum(counts[-args.steps:], 0).tolist()
    return dict(**m, samples=args.steps * args.batch_size, tokens=real, padded=total)


def ref_eval(args, ds, device, dtype):
    """The reference scores a split in its stored order (a sequential sampler), padded to the longest."""
    model, tok, cfg = build(args, ds, dtype, device, with_rec=True, ours=False)
    prompts, split, batch_size = ReferencePrompts(ds, tok, args.stage), ds.splits["test"], args.eval_batch_size
    rows = eval_rows(args, ds)
    batches = [rows[k:k + batch_size] for k in range(0, len(rows), batch_size)]
    model.eval()
    counts = []

    def run(rows_list):
        counts.clear()
        with torch.no_grad(), train.autocast(device, dtype):
            for rs in rows_list:
                batch = {k: v.to(device) for k, v in prompts(split, rs).items()}
                counts.append((int(batch["attention_mask"].sum()), batch["attention_mask"].numel()))
                reference_scores(model, batch, args.stage, prompts.slot_id).cpu()

    m = measure(device, args, lambda: run(batches[:1]), lambda: run(batches))
    real, total = np.sum(counts, 0).tolist()
    return dict(**m, samples=len(rows), tokens=real, padded=total)


# ---------------------------------------------------------------------------------------------
# One user's catalog (tools/use.py --user U --candidates unseen): thousands of rows with one
# history, so one prompt prefix up to the target title


def user_catalog(args, ds, model, tok, cfg, n=None):
    """-> (the candidate split, its encoding): the first test row's user, every item they have no
    rating of, with their current history (the first n of them, if n). On data where that user rated
    every item (the toy data of the tests), every item instead: the same prompts, rated or not."""
    user = int(ds.splits["test"].uid[0])
    split, _, _ = use.candidates(ds, user, unseen=True)
    items = split.iid.tolist() or np.flatnonzero(data.items_in_data(ds)).tolist()
    split, _, _ = use.candidates(ds, user, items=items[:n])
    enc = collm.encode(cfg, replace(ds, splits={**ds.splits, "rank": split}), tok, "rank", model)
    return split, enc


def catalog(args, ds, device, dtype):
    """Rows/s of the catalog path (eval.score_catalog: the prefix once, then each row's own tokens)
    against plain scoring of the same first --eval-rows candidates: eval.score_rows with each row's
    whole prompt in one call ("plain"), and score_rows as it scores a split, the prefix run once per
    batch ("batched"). Then the wall time of the catalog path over the user's whole catalog, once."""
    model, tok, cfg = build(args, ds, dtype, device, with_rec=collm.STAGES[args.stage]["rec"])
    pad, batch_size = data.SegmentTokenizer(tok).pad_id, args.eval_batch_size
    split, enc = user_catalog(args, ds, model, tok, cfg, args.eval_rows)
    rows = np.arange(len(split))

    def rate(prefix_cache, score):  # rows/s, the best of --repeats passes after one warm-up batch
        model.prefix_cache = prefix_cache
        score(rows[:batch_size])
        return len(rows) / timed_passes(device, args, lambda: score(rows))[0]
    plain = lambda rs: metrics.score_rows(model, enc, split, rs, batch_size, pad, device, dtype)
    sample = lambda rs: metrics.score_catalog(model, enc, split, batch_size, pad, device, dtype, rs)
    out = dict(catalog_rows_per_s=rate(True, sample), plain_rows_per_s=rate(False, plain),
               batched_rows_per_s=rate(True, plain), sample_rows=len(rows), mean_len=float(enc.lengths.mean()),
               mean_rest_len=float((enc.lengths - enc.shared).mean()),
               # what would make the prefix buy nothing, said in the result: one prefix per row (a tokenizer
               # that changes tokens before the title), or other jobs on the cores while the rates were timed
               sample_prefixes=len(np.unique(data.prefix_groups(enc, rows))), load_average=load_average())
    print(json.dumps(out), file=sys.stderr, flush=True)  # the rates now: the whole catalog can take minutes
    t = time.perf_counter()
    whole, whole_enc = user_catalog(args, ds, model, tok, cfg)
    out.update(user=int(whole.uid[0]), catalog_rows=len(whole), catalog_encode_seconds=time.perf_counter() - t)
    model.prefix_cache = True
    out["catalog_seconds"] = clock(device, lambda: metrics.score_catalog(model, whole_enc, whole, batch_size, pad,
                                                                         device, dtype))
    out.update(catalog_speedup=out["catalog_rows_per_s"] / out["plain_rows_per_s"],
               catalog_speedup_batched=out["catalog_rows_per_s"] / out["batched_rows_per_s"])
    out.update(retrieve_rerank(args, ds, model, tok, cfg, whole, device, dtype))
    return out


def retrieve_rerank(args, ds, model, tok, cfg, whole, device, dtype):
    """Seconds of tools/use.py's default for one user's catalog: the collaborative model (stage 2's
    own, a fresh MF here; pop for stage 1) scores every unseen item, the LLM reranks its top
    use.RETRIEVE with the prefix once; the prompts' tokenising included, the model's loading not."""
    def run():
        retriever = use.retriever_of(argparse.Namespace(rec_ckpt=None), model, ds)
        labels = np.full(len(whole), np.nan)
        split, _, _, _ = use.retrieve(ds, whole, labels, retriever, use.RETRIEVE)
        enc = collm.encode(cfg, replace(ds, splits={**ds.splits, "rank": split}), tok, "rank", model)
        metrics.score_catalog(model, enc, split, args.eval_batch_size, data.SegmentTokenizer(tok).pad_id, device, dtype)
    return dict(retrieve_n=min(use.RETRIEVE, len(whole)), retrieve_rerank_seconds=clock(device, run))


# ---------------------------------------------------------------------------------------------
# The baseline: the device's matmul peak, and our model alone on one fixed-shape batch


def baseline(args, ds, device, dtype):
    """The device's matmul peak, and our model's train step and scoring on fixed-shape batches of
    FIXED_LEN random tokens: what the hardware gives before any prompt varies in length."""
    peak = matmul_peak(device, dtype, args.matmul_size)
    model, tok, cfg = build(args, ds, dtype, device, with_rec=collm.STAGES[args.stage]["rec"])
    vocab = model.llm.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(args.seed)

    def fixed_batch(b):  # random token ids: the matmuls cost the same whatever the ids
        return dict(input_ids=torch.randint(vocab, (b, FIXED_LEN), generator=gen).to(device),
                    last=torch.full((b,), FIXED_LEN - 1, device=device), slots=torch.tensor([[3, 7]] * b, device=device),
                    uid=torch.ones(b, dtype=torch.long, device=device), iid=torch.ones(b, dtype=torch.long, device=device),
                    label=torch.ones(b, device=device))

    step = train_step_fn(model, device, dtype, lambda batch: model(**batch))
    tb, eb = fixed_batch(args.batch_size), fixed_batch(args.eval_batch_size)

    def score():
        with torch.no_grad(), train.autocast(device, dtype):
            model(**eb).cpu()

    c = model.llm.config
    width = c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    out = dict(peak_flops=peak, n_params=decoder_matrix_params(model), threads=torch.get_num_threads(),
               attn_width=width * c.num_hidden_layers)
    model.train()
    for _ in range(max(1, args.warmup)):
        step(tb)
    out["train_seconds"] = timed_passes(device, args, lambda: [step(tb) for _ in range(args.steps)])[0] / args.steps
    model.eval()
    for _ in range(max(1, args.warmup)):
        score()
    out["eval_seconds"] = timed_passes(device, args, lambda: [score() for _ in range(args.steps)])[0] / args.steps
    return out


MEASURE = {"baseline": baseline, "ours-train": ours_train, "ours-eval": ours_eval, "ref-train": ref_train,
           "ref-eval": ref_eval, "whole-train": lambda *args: ours_train(*args, prefix_cache=False),
           "whole-eval": lambda *args: ours_eval(*args, prefix_cache=False), "catalog": catalog}


def run_child(args, device, dtype):
    ds = data.load_dataset(args.data, args.data_root)
    t = time.time()
    out = MEASURE[args.only](args, ds, device, dtype)
    out["wall"] = time.time() - t
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# The parent: one child per measurement, then the table and the JSON line


def spawn(argv, name):
    """Run `bench.py ARGV --only NAME` in a fresh process -> its JSON result."""
    t = time.time()
    res = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--only", name],
                         capture_output=True, text=True)
    if res.returncode == 2 and res.stderr.strip().splitlines()[-1:][0].startswith("error:"):
        raise UsageError(res.stderr.strip().splitlines()[-1][len("error: "):])
    if res.returncode != 0:
        raise RuntimeError(f"bench.py --only {name} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    print(f"  {name:<11} done in {time.time() - t:5.1f} s", flush=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def rates(r, flops_per_token, peak, mean_len):
    """A child's result -> samples/s, tokens/s, useful FLOP/s and its share of the peak, padding share.

    samples/s is counted at the split's mean prompt length (`mean_len` real tokens a row): real
    tokens/s / mean_len, i.e. the rate at which a whole epoch would go. The few timed batches are
    drawn at random, so their rows are longer or shorter than the average (ours 144 vs the
    reference's 159 tokens a row in one 3-step draw): rows/s of the draw itself would credit
    whichever path drew the shorter rows. Padding is not a real token, so it stays a cost."""
    s = r["seconds"]
    return dict(samples=r["tokens"] / s / mean_len, tokens=r["tokens"] / s, flops=flops_per_token * r["tokens"] / s,
                share=flops_per_token * r["tokens"] / s / peak, padding=1 - r["tokens"] / r["padded"])


def attention_extra(base, length):
    """Causal attention scores per token, forward, at prompt length L: QK^T and AV each 2 * (L/2) * width
    per layer; as a fraction of the 2N counted."""
    return 2 * length * base["attn_width"] / (2 * base["n_params"])


def gb(x):
    return f"{x / 2 ** 30:.2f} GB"


def print_flop_note(args, device, dtype_name, base, train_ours):
    """What the FLOP counts are, and what they leave out, under the device line."""
    peak, N = base["peak_flops"], base["n_params"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {base['threads']} threads"
    print(f"\ndevice: {name}; {dtype_name} matmul peak ({args.matmul_size}^3, best of 5) {peak / 1e9:.1f} GFLOP/s")
    print(f"FLOPs per real token: 2N forward, 4N forward + backward, N = {N / 1e6:.1f}M decoder matrix parameters.\n"
          f"  Not counted: the {train_ours['n_embed'] / 1e6:.1f}M embedding / LM-head parameters (we compute one LM-head row; "
          f"counting them would multiply every share by {(N + train_ours['n_embed']) / N:.2f}),\n"
          f"  attention scores (about {attention_extra(base, train_ours['mean_len']):.0%} more at this data's mean "
          f"{train_ours['mean_len']:.0f} tokens) and LoRA's rank-r matrices. A shared prefix computed once, or run\n"
          f"  without its backward, still counts as if computed in full: what it saves shows as a higher share.")


def print_rate_table(args, device, res, train_rate, eval_rate):
    """One line per path: samples/s, tokens/s, useful FLOP/s and their share of the peak, padding, memory."""
    base, peak = res["baseline"], res["baseline"]["peak_flops"]
    f_train, f_eval = 4 * base["n_params"], 2 * base["n_params"]
    train_len, eval_len = res["ours-train"]["mean_len"], res["ours-eval"]["mean_len"]

    def fixed(b, seconds, mean_len, flops_per_token):  # FIXED_LEN-token rows, samples/s at the mean length
        return dict(samples=b * FIXED_LEN / seconds / mean_len, tokens=b * FIXED_LEN / seconds, padding=0.0,
                    flops=flops_per_token * b * FIXED_LEN / seconds)
    rows = [(f"train  fixed {args.batch_size}x{FIXED_LEN}",
             fixed(args.batch_size, base["train_seconds"], train_len, f_train), None)]
    rows += [(f"train  {label}", train_rate(res[key]), res[key]) for label, key in
             (("ours", "ours-train"), ("whole prompt", "whole-train"), ("reference", "ref-train")) if key in res]
    rows += [(f"eval   fixed {args.eval_batch_size}x{FIXED_LEN}",
              fixed(args.eval_batch_size, base["eval_seconds"], eval_len, f_eval), None)]
    rows += [(f"eval   {label}", eval_rate(res[key]), res[key]) for label, key in
             (("ours", "ours-eval"), ("whole prompt", "whole-eval"), ("reference", "ref-eval"))]
    mem_kind = "peak alloc" if device.type == "cuda" else "peak RSS"
    print(f"\n{'':<22}{'samples/s':>10}{'tokens/s':>10}{'GFLOP/s':>9}{'of peak':>8}{'padding':>9}"
          f"{mem_kind:>12}{'over base':>11}{'tensors':>9}")
    for label, r, raw in rows:
        mem = f"{gb(raw['mem_peak']):>12}{gb(raw['mem_peak'] - raw['mem_base']):>11}{gb(raw['mem_tensors']):>9}" \
            if raw else f"{'':>12}{'':>11}{'':>9}"
        print(f"{label:<22}{r['samples']:>10.2f}{r['tokens']:>10.0f}{r['flops'] / 1e9:>9.1f}"
              f"{r['flops'] / peak:>8.2f}{r['padding']:>9.1%}{mem}")
    return rows


def report(args, device, dtype_name, res, load):
    """The children's results -> the table, the ratios that answer the three questions, the JSON line."""
    base = res["baseline"]
    train_ours, eval_ours, train_ref, eval_ref = (res[k] for k in ("ours-train", "ours-eval", "ref-train", "ref-eval"))
    train_whole, eval_whole = res.get("whole-train"), res["whole-eval"]
    peak, N = base["peak_flops"], base["n_params"]
    f_train, f_eval = 4 * N, 2 * N  # matmul FLOPs per real token (see the module docstring)
    print_flop_note(args, device, dtype_name, base, train_ours)
    train_rate = lambda r: rates(r, f_train, peak, train_ours["mean_len"])
    eval_rate = lambda r: rates(r, f_eval, peak, eval_ours["mean_len"])
    print_rate_table(args, device, res, train_rate, eval_rate)
    mem_kind = "peak alloc" if device.type == "cuda" else "peak RSS"
    tr, te = train_rate(train_ours), eval_rate(eval_ours)
    speedup_train = tr["samples"] / train_rate(train_ref)["samples"]
    speedup_eval = te["samples"] / eval_rate(eval_ref)["samples"]
    prefix_train = tr["samples"] / train_rate(train_whole)["samples"] if train_whole else None
    prefix_eval = te["samples"] / eval_rate(eval_whole)["samples"]
    ratio = lambda a, b, key: a[key] / max(1, b[key])  # shared prefixes / whole prompt: peak RSS, live tensors
    prefix_mem_train = ratio(train_ours, train_whole, "mem_peak") if train_whole else None
    prefix_tensors_train = ratio(train_ours, train_whole, "mem_tensors") if train_whole else None
    prefix_mem_eval, prefix_tensors_eval = ratio(eval_ours, eval_whole, "mem_peak"), ratio(eval_ours, eval_whole, "mem_tensors")
    mem_train = train_ours["mem_peak"] / train_ref["mem_peak"]
    mem_over = (train_ours["mem_peak"] - train_ours["mem_base"]) / max(1, train_ref["mem_peak"] - train_ref["mem_base"])
    print(f"\nours / reference: train {speedup_train:.2f}x samples/s, eval {speedup_eval:.2f}x samples/s; "
          f"train {mem_kind} {mem_train:.2f}x (over the post-load base: {mem_over:.2f}x), "
          f"eval {mem_kind} {eval_ours['mem_peak'] / eval_ref['mem_peak']:.2f}x")
    print(f"shared prefixes / whole prompt: train " + (f"{prefix_train:.2f}x" if train_whole else "- (stage 1 trains every position)")
          + f", eval {prefix_eval:.2f}x ({eval_ours['samples']} test rows in split order, {eval_ours['prefixes']} distinct "
          f"prefixes, {eval_ours['shared_share']:.0%} of their tokens before the target title); peak memory "
          + (f"train {prefix_mem_train:.2f}x, " if train_whole else "") + f"eval {prefix_mem_eval:.2f}x, "
          + "tensors " + (f"train {prefix_tensors_train:.2f}x, " if train_whole else "") + f"eval {prefix_tensors_eval:.2f}x")
    cat = res["catalog"]
    print(f"one user's catalog (user {cat['user']}, {cat['catalog_rows']:,} unseen items): prefix once, then "
          f"{cat['mean_rest_len']:.0f} of {cat['mean_len']:.0f} tokens a row: {cat['catalog_rows_per_s']:.1f} rows/s, "
          f"{cat['catalog_speedup']:.2f}x plain scoring ({cat['sample_prefixes']} prefix for its {cat['sample_rows']} "
          f"sampled rows), {cat['catalog_speedup_batched']:.2f}x the prefix once per batch; "
          f"whole catalog {cat['catalog_seconds']:.1f} s (+ {cat['catalog_encode_seconds']:.1f} s building its prompts); "
          f"retrieve-then-rerank (tools/use.py's default, the LLM on the retriever's top {cat['retrieve_n']}) "
          f"{cat['retrieve_rerank_seconds']:.1f} s")
    print(f"samples/s: real tokens/s over the mean prompt, {train_ours['mean_len']:.0f} tokens (train split) and "
          f"{eval_ours['mean_len']:.0f} (the scored test rows): an epoch's rate, whatever rows the timed batches drew")
    print(f"padding over a whole epoch: ours {train_ours['padding_epoch']:.1%} of train tokens (length-bucketed), "
          f"reference {train_ours['ref_padding_epoch']:.1%} (random batches); scoring ours {te['padding']:.1%}, "
          f"reference {eval_rate(eval_ref)['padding']:.1%}")
    return dict(train_samples_per_s=round(tr["samples"], 3), eval_samples_per_s=round(te["samples"], 3),
                train_peak_share=round(tr["share"], 4), eval_peak_share=round(te["share"], 4),
                padding_share=round(train_ours["padding_epoch"], 4), ref_padding_share=round(train_ours["ref_padding_epoch"], 4),
                speedup_train=round(speedup_train, 3), speedup_eval=round(speedup_eval, 3),
                prefix_speedup_train=round(prefix_train, 3) if train_whole else None,
                prefix_speedup_eval=round(prefix_eval, 3), prefix_mem_train=round(prefix_mem_train, 3) if train_whole else None,
                prefix_mem_eval=round(prefix_mem_eval, 3), prefix_tensors_train=round(prefix_tensors_train, 3) if train_whole else None,
                prefix_tensors_eval=round(prefix_tensors_eval, 3), mem_ratio_train=round(mem_train, 3), device=device.type,
                dtype=dtype_name, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                cpu_bf16_units=train.cpu_has_bf16_units(), llm=args.llm, stage=args.stage, compile=args.compile,
                grad_checkpoint=args.grad_checkpoint, peak_flops=peak, n_params=N, eval_padding_share=round(te["padding"], 4),
                fixed_train_peak_share=round(f_train * args.batch_size * FIXED_LEN / base["train_seconds"] / peak, 4),
                fixed_eval_peak_share=round(f_eval * args.eval_batch_size * FIXED_LEN / base["eval_seconds"] / peak, 4),
                mem_ratio_train_over_base=round(mem_over, 3), load_average=load,
                catalog_speedup=round(cat["catalog_speedup"], 3), catalog_speedup_batched=round(cat["catalog_speedup_batched"], 3),
                catalog_rows=cat["catalog_rows"], catalog_sample_prefixes=cat["sample_prefixes"], catalog_seconds=round(cat["catalog_seconds"], 2),
                retrieve_n=cat["retrieve_n"], retrieve_rerank_seconds=round(cat["retrieve_rerank_seconds"], 2))


def load_average():
    """The 1, 5 and 15 minute load averages in words: above the core count, other jobs shared the timings."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device, dtype, dtype_name, dtype_reason = device_and_dtype(args)
    if args.only:
        return run_child(args, device, dtype)
    load = load_average()
    print(f"=> bench {args.llm} | stage {args.stage} | {device.type} {dtype_name} ({dtype_reason}) | batch {args.batch_size}, eval batch "
          f"{args.eval_batch_size} | {args.steps} steps after {args.warmup} warm-up, best of {args.repeats} "
          f"| compile {'on' if args.compile else 'off'} | grad checkpoint {'on' if args.grad_checkpoint else 'off'} "
          f"| load average {load}", flush=True)
    # stage 1 always runs the whole prompt in one call (LoRA trains everywhere): no "whole-train" to time
    children = [c for c in CHILDREN if not (c == "whole-train" and args.stage == "lora")]
    res = {name: spawn(argv, name) for name in children}
    summary = report(args, device, dtype_name, res, load)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    data.cli_main(main)
