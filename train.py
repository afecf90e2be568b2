"""train.py: one plain PyTorch loop for both CoLLM training stages (paper section 3.3).

    python train.py --stage lora --out runs/lora                       # stage 1: LoRA on text prompts (= TALLRec)
    python train.py --stage cie --ckpt runs/lora/best.pt \\
                    --rec mf --rec-ckpt runs/mf/model.pt --out runs/cie  # stage 2: the projector ("CIE")
    torchrun --nproc-per-node 8 train.py --stage lora ...               # the same on 8 GPUs (DDP)

Stage 1 trains only the LoRA adapters, on prompts made of titles alone. Stage 2 loads those adapters
and freezes them, loads a trained collaborative model (collab.py) and freezes it too, and trains only
the projector that maps its user/item embeddings into the two prompt slots (`--tune-rec` trains the
collaborative model as well, the paper's section 5.3.2 variant).

What the loop does, step by step: AdamW with linear warmup then cosine decay driven by the global
step; gradient accumulation; clipping; bf16/fp16 autocast; evaluation on a fixed valid subset every
`--eval-every` steps, keeping the best-AUC checkpoint and stopping after `--patience` evaluations
without improvement; at the end, the best checkpoint is scored on the test split and metrics.json is
written beside it. Checkpoints hold only the small tensors (LoRA, projector, collaborative model),
never the LLM, and are written atomically; `--resume DIR` continues a stopped run exactly.
"""
import argparse
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import collab
import collm
import data
import eval as metrics  # our eval.py (named so that it does not shadow the builtin)
from data import UsageError

# ---------------------------------------------------------------------------------------------
# Settings: one dataclass, and the command line is generated from it (help text lives here)


def opt(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class Config:
    stage: str = opt("lora", "lora: stage 1, LoRA on text-only prompts (TALLRec); cie: stage 2, the projector",
                     choices=("lora", "cie"))
    llm: str = opt("smollm2-135m", "tiny | smollm2-135m | a model folder | a hub id (e.g. lmsys/vicuna-7b-v1.3) | "
                                   "random:vicuna-7b, random:qwen2-1.5b, random:smollm2-135m (the real shapes with "
                                   "random weights: speed and memory only)")
    ckpt: str = opt(None, "stage 2: the stage-1 checkpoint (its best.pt) whose LoRA is loaded and frozen")
    rec: str = opt("mf", "stage 2: the collaborative model", choices=tuple(collab.MODELS))
    rec_ckpt: str = opt(None, "stage 2: a collab.py model.pt (frozen unless --tune-rec)")
    tune_rec: bool = opt(False, "stage 2: train the collaborative model too (from --rec-ckpt, or from scratch)")
    data: str = opt("ml-1m", "dataset name under the data root, or a dataset folder")
    data_root: str = opt(None, "folder holding datasets (default $COLLM_DATA, else ./data)")
    template: str = opt(None, "prompt template file (default prompts/<domain>_<text|collm>.txt)")
    out: str = opt(None, "output folder for best.pt, last.pt, metrics.json (default runs/<stage>)")
    cache_dir: str = opt("cache", "where converted models (SmolLM2's safetensors copy) are kept")
    device: str = opt("auto", "auto (cuda if available) | cpu | cuda", choices=("auto", "cpu", "cuda"))
    dtype: str = opt("auto", "compute dtype; auto = what the hardware computes natively: bf16 on GPUs and CPUs "
                             "with bf16 units (AVX-512 BF16/AMX), fp16 on older GPUs, fp32 on other CPUs",
                     choices=("auto", "bf16", "fp16", "fp32"))
    batch_size: int = opt(8, "rows per micro-batch per process (the reference: 16 per GPU)")
    grad_accum: int = opt(1, "micro-batches per optimizer step (global batch = batch * accum * processes)")
    eval_batch_size: int = opt(0, "rows per scoring batch (0 = twice --batch-size)")
    lr: float = opt(1e-3, "peak learning rate (the reference's ML-1M value for both stages)")
    min_lr: float = opt(8e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(200, "linear warmup length in optimizer steps")
    warmup_start_lr: float = opt(1e-5, "learning rate at step 0")
    weight_decay: float = opt(1e-3, "AdamW weight decay, on matrices only (not biases)")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    max_steps: int = opt(2000, "optimizer steps; also the length of the cosine schedule")
    eval_every: int = opt(50, "evaluate (and save last.pt) every N steps (the reference's 'epoch' = 50 steps)")
    eval_split: str = opt("valid_small", "split used for model selection", choices=("valid_small", "valid"))
    eval_rows: int = opt(0, "score only the first N rows of --eval-split while training (0 = all)")
    test_rows: int = opt(0, "score only the first N test rows at the end (0 = all)")
    patience: int = opt(20, "stop after this many evaluations without a better valid AUC")
    seed: int = opt(2023, "seed for initialisation, batch order and dropout")
    bucket: bool = opt(True, "group rows of similar length into batches (under 5%% padding)")
    grad_checkpoint: bool = opt(False, "activation checkpointing of the decoder layers: each layer's activations are "
                                       "recomputed in the backward instead of kept (about 1/3 more compute, far less "
                                       "memory: for GPUs too small for a batch)")
    compile: bool = opt(False, "torch.compile each decoder layer (collm.compile_decoder): on CPU ~15%% faster "
                               "steps and about half the activation memory, after tens of seconds of compiling")
    log_every: int = opt(10, "print a log line every N steps")
    pause_at: int = opt(0, "end this sitting after N steps with last.pt saved; --resume continues (0 = off)")
    resume: str = opt(None, "continue the run saved in this folder (its last.pt and settings)")
    lora_r: int = opt(8, "LoRA rank (stage 2 takes this and the other --lora-* settings from --ckpt)")
    lora_alpha: int = opt(16, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input")
    lora_targets: str = opt("q_proj,v_proj", "comma-separated module names that get LoRA")
    lora_layers: int = opt(0, "LoRA in the top N decoder layers only; the layers below then run forward-only "
                              "(0 = every layer, the paper's)")
    calibrate: bool = opt(False, "before the first step, shift the score by a constant so that the mean logit on "
                                 "256 train rows is the logit of the train positive rate (a small LLM's untrained "
                                 "'Yes' logit is far off: SmolLM2's first loss is ~4.7); AUC is unchanged by it")


def parse_config(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            p.add_argument(flag, type={"int": int, "float": float}.get(str(f.type), None) or (f.type if callable(f.type) else str),
                           default=f.default, help=f.metadata["help"], choices=f.metadata.get("choices"))
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.resume:
        cfg = resume_config(cfg)
    check_config(cfg)
    if cfg.stage == "cie" and not cfg.resume:
        # Stage 2 loads stage 1's adapters, so their shape is stage 1's whatever this command says;
        # recorded in this run's settings, so that resuming and eval.py rebuild the same shape.
        saved = load_checkpoint(cfg.ckpt).get("config", {})
        cfg = replace(cfg, **{k: saved[k] for k in LORA_SHAPE if k in saved})
    return cfg


LORA_SHAPE = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_layers")


def check_config(cfg):
    """Report every bad setting at once, before anything slow happens."""
    problems = []
    for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "patience", "lora_r"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(cfg, name)})")
    if cfg.lora_layers < 0:
        problems.append(f"--lora-layers must be >= 0 (got {cfg.lora_layers})")
    for name in ("lr", "min_lr", "warmup_start_lr"):
        if not getattr(cfg, name) > 0:
            problems.append(f"--{name.replace('_', '-')} must be > 0 (got {getattr(cfg, name)})")
    if cfg.stage == "cie" and not cfg.ckpt:
        problems.append("--stage cie needs --ckpt, the stage-1 checkpoint (e.g. runs/lora/best.pt)")
    if cfg.stage == "cie" and cfg.rec == "pop":
        problems.append("--rec pop: the popularity baseline has no user or item embeddings to put in CoLLM's "
                        "slots; use mf, lightgcn, sasrec or din")
    if cfg.stage == "cie" and not cfg.rec_ckpt and not cfg.tune_rec:
        problems.append("--stage cie needs --rec-ckpt (a collab.py model.pt), or --tune-rec to train one from scratch")
    for name in ("ckpt", "rec_ckpt"):
        path = getattr(cfg, name)
        if path and not os.path.isfile(path):
            problems.append(f"--{name.replace('_', '-')} {path}: file not found")
    if problems:
        raise UsageError("; ".join(problems))


def resume_config(cfg):
    """--resume DIR: the saved settings win (the schedule depends on them); only `pause_at` is new."""
    path = os.path.join(cfg.resume, "last.pt")
    if not os.path.isfile(path):
        raise UsageError(f"--resume {cfg.resume}: no last.pt there")
    saved = load_checkpoint(path)["config"]
    return Config(**{**saved, "resume": cfg.resume, "pause_at": cfg.pause_at, "out": cfg.resume})


# ---------------------------------------------------------------------------------------------
# Processes, devices and precision


def setup_distributed(cfg):
    """-> (rank, world, device). Plain `python train.py` is world 1; torchrun sets RANK/WORLD_SIZE."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")  # gloo is the CPU backend
    return rank, world, device


# Which dtype to compute in. Half precision (bf16/fp16) halves memory and, on hardware built for it,
# doubles or quadruples matmul speed. On hardware NOT built for it, it is a disaster: a CPU without
# bf16 matrix units (AVX2 only; most laptops, many cloud machines) ran a 2048^3 bf16 matmul at
# 0.3 GFLOP/s against 142 GFLOP/s in fp32, about 500 times slower (2-core AMD EPYC, Zen 3, torch 2.13).
# So `--dtype auto` picks what the hardware computes natively, and says why.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}  # None = plain fp32, no autocast
BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX-512 BF16 / AMX, Arm's BF16 extension
CPUINFO = "/proc/cpuinfo"


def cpu_has_bf16_units():
    """True when the CPU has bf16 matrix instructions, read from the kernel's CPU flags (Linux).
    torch's own check (torch.ops.mkldnn._is_mkldnn_bf16_supported) only asks for AVX-512, which
    CPUs without bf16 units have too. Where /proc/cpuinfo does not exist we cannot tell, so False:
    fp32 is never wrong, at worst slower."""
    try:
        with open(CPUINFO) as f:
            flags = {w for line in f if line.startswith(("flags", "Features")) for w in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return bool(flags & BF16_CPU_FLAGS)


def native_dtype(device):
    """-> (dtype name, reason): the fastest dtype this device computes natively."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "the GPU computes bf16"
        return "fp16", "the GPU has no bf16 (fp16 with loss scaling)"
    if cpu_has_bf16_units():
        return "bf16", "the CPU has bf16 matrix units (AVX-512 BF16 / AMX)"
    return "fp32", "the CPU has no bf16 matrix units, where bf16 runs ~500x slower than fp32"


def compute_dtype(choice, device):
    """--dtype (auto | bf16 | fp16 | fp32) -> (torch dtype or None for fp32, name, reason). An explicit
    half dtype on a CPU without units for it still runs, after a warning: the user asked for it."""
    if choice == "auto":
        name, reason = native_dtype(device)
        return DTYPES[name], name, "auto: " + reason
    if device.type == "cpu" and choice != "fp32" and native_dtype(device)[0] != choice:
        print(f"warning: --dtype {choice} on a CPU without {choice} matrix units: matmuls run about 500x slower "
              f"than fp32 there (0.3 vs 142 GFLOP/s measured on an AVX2 CPU); --dtype auto picks fp32", flush=True)
    return DTYPES[choice], choice, "set by --dtype"


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# ---------------------------------------------------------------------------------------------
# Checkpoints: only the small tensors + settings + loop state, written atomically


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint, a pickle from elsewhere
        raise UsageError(f"{path}: not a train.py checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})")


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous file intact


def model_tensors(model):
    """What a checkpoint keeps of the model: LoRA, the projector and the collaborative model."""
    from peft import get_peft_model_state_dict
    out = {"lora": get_peft_model_state_dict(model.llm), "score_bias": float(model.score_bias)}
    if model.rec is not None:
        out["proj"] = model.proj.state_dict()
        out["rec"] = collab.rec_checkpoint(model.rec)
    return out


# ---------------------------------------------------------------------------------------------
# Building the model for a stage (eval.py calls this too, with a checkpoint's saved tensors)


def build_model(cfg, data_set, dtype, state=None):
    """-> (CoLLM, tokenizer). `state` = a checkpoint of this script whose tensors are loaded
    (resume, evaluation); without it, stage 2 takes LoRA from --ckpt and the rec model from --rec-ckpt."""
    from peft import set_peft_model_state_dict
    stage1 = None
    if cfg.stage == "cie" and state is None:
        stage1 = load_checkpoint(cfg.ckpt)
        if "lora" not in stage1 or "llm" not in stage1.get("config", {}):  # e.g. a collab.py model.pt
            what = f"a collab.py {stage1['model']} model.pt" if "state_dict" in stage1 and "model" in stage1 else \
                "not a train.py checkpoint"
            raise UsageError(f"--ckpt {cfg.ckpt}: {what}; --ckpt takes stage 1's best.pt (train.py --stage lora), "
                             f"the collaborative model goes to --rec-ckpt")
        if stage1["config"].get("stage") != "lora" or stage1["config"]["llm"] != cfg.llm:
            raise UsageError(f"--ckpt {cfg.ckpt}: a stage-{stage1['config'].get('stage')} checkpoint of "
                             f"--llm {stage1['config']['llm']}; expected a stage-lora checkpoint of --llm {cfg.llm}")
        lora_cfg = stage1["config"]  # the adapters must be rebuilt with the shape they were trained with
    else:
        lora_cfg = asdict(cfg)
    llm, tok = collm.load_llm(cfg.llm, cfg.cache_dir, dtype or torch.float32)
    if cfg.grad_checkpoint:  # non-reentrant: works although the input embeddings need no gradient
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    yes = collm.yes_token_id(tok)
    llm = collm.add_lora(llm, lora_cfg["lora_r"], lora_cfg["lora_alpha"], lora_cfg["lora_dropout"],
                         lora_cfg["lora_targets"].split(","), lora_cfg.get("lora_layers", 0))
    lora = (state or stage1 or {}).get("lora")
    if lora is not None:
        result = set_peft_model_state_dict(llm, lora)
        if getattr(result, "unexpected_keys", None):
            raise UsageError(f"{cfg.ckpt or cfg.resume}: LoRA tensors do not fit --llm {cfg.llm}")
    rec = None
    if cfg.stage == "cie":
        if state is not None:
            rec = collab.rec_from_checkpoint(state["rec"], data_set.user_num, data_set.item_num, "checkpoint")
        elif cfg.rec_ckpt:
            rec = collab.load_rec(cfg.rec_ckpt, data_set.user_num, data_set.item_num)
        else:  # --tune-rec from scratch
            rec = collab.new_rec(cfg.rec, data_set)
        if collab.model_name(rec) != cfg.rec:  # a DIN checkpoint would fill the slots of a run that says MF
            raise UsageError(f"--rec-ckpt {cfg.rec_ckpt or cfg.resume}: a {collab.model_name(rec)} model, but "
                             f"--rec is {cfg.rec}")
    model = collm.CoLLM(llm, yes, rec, tune_rec=cfg.tune_rec)
    model.score_bias.fill_((state or stage1 or {}).get("score_bias", 0.0))  # stage 2 starts from stage 1's
    if state is not None and rec is not None:
        model.proj.load_state_dict(state["proj"])
    # Exactly the tensors this stage trains: LoRA in stage 1; the projector (+ rec) in stage 2.
    for name, p in model.named_parameters():
        p.requires_grad_(("lora_" in name) if cfg.stage == "lora" else
                         name.startswith("proj.") or (cfg.tune_rec and name.startswith("rec.")))
    return model, tok


def encode(cfg, data_set, tok, split, model):
    """Tokenise a split's prompts once, and check the longest fits the LLM's context."""
    template = data.load_template(data_set.domain, "text" if cfg.stage == "lora" else "collm", cfg.template)
    enc = data.encode_split(data_set, split, data.SegmentTokenizer(tok), template)
    limit = getattr(model.llm.config, "max_position_embeddings", None)
    if limit and enc.lengths.max() > limit:
        r = int(enc.lengths.argmax())
        raise UsageError(f"{split} row {r}: prompt of {enc.lengths[r]} tokens is longer than --llm {cfg.llm}'s "
                         f"context of {limit}; nothing is truncated")
    return enc


# ---------------------------------------------------------------------------------------------
# Learning rate: warmup then cosine, a pure function of the GLOBAL step (the reference restarted
# its warmup every 'epoch', a sawtooth)


def lr_at(step, cfg):
    if step < cfg.warmup_steps:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------
# The loop


def train(cfg):
    t0 = time.time()
    rank, world, device = setup_distributed(cfg)
    master = rank == 0  # rank 0 logs and saves; every rank computes
    dtype, dtype_name, dtype_reason = compute_dtype(cfg.dtype, device)
    out = cfg.out or os.path.join("runs", cfg.stage)
    state = load_checkpoint(os.path.join(cfg.resume, "last.pt")) if cfg.resume else None
    torch.manual_seed(cfg.seed)  # identical LoRA/projector init on every rank
    ds = data.load_dataset(cfg.data, cfg.data_root)
    model, tok = build_model(cfg, ds, dtype, state)
    enc_train = encode(cfg, ds, tok, "train", model)
    enc_eval = encode(cfg, ds, tok, cfg.eval_split, model)
    pad = data.SegmentTokenizer(tok).pad_id
    model.to(device)
    if cfg.compile:
        collm.compile_decoder(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # DDP syncs the parameters that require grad when it is built: freeze/unfreeze first (done in
    # build_model), then wrap, then build the optimizer.
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    decay = [p for p in trainable.values() if p.ndim >= 2]      # matrices decay, biases do not
    no_decay = [p for p in trainable.values() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
    step, best, bad_evals, history = 0, {"auc": -1.0, "step": 0}, 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, best, bad_evals, history = state["step"], state["best"], state["bad_evals"], state["history"]
    eval_rows = np.arange(len(ds.splits[cfg.eval_split]))[:cfg.eval_rows or None]
    ebs = cfg.eval_batch_size or 2 * cfg.batch_size
    if cfg.calibrate and state is None:
        shift = calibrate(model, enc_train, ds.splits["train"], ebs, pad, device, dtype, cfg.seed)
        if master:
            print(f"calibrated: every score shifted by {shift:+.3f} (now {float(model.score_bias):+.3f})")
    if master:
        os.makedirs(out, exist_ok=True)
        n_train = sum(p.numel() for p in trainable.values())
        print(f"=> stage {cfg.stage} | llm {cfg.llm} | {device} {dtype_name} ({dtype_reason}) "
              f"| processes {world} | global batch {cfg.batch_size * cfg.grad_accum * world} "
              f"| trainable {n_train:,} in {len(trainable)} tensors | out {out}")

    # Batches: each epoch's batch list is a function of (seed, epoch), identical on every rank;
    # rank r takes every world-th batch. So any step's batch can be recomputed on resume.
    lengths = enc_train.lengths
    per_rank = len(data.train_batches(lengths, cfg.batch_size, np.random.default_rng(0), False)) // world
    epoch_cache = {}

    def micro_batch(m):
        epoch, k = divmod(m, per_rank)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            rng = np.random.default_rng([cfg.seed, epoch])
            epoch_cache[epoch] = data.train_batches(lengths, cfg.batch_size, rng, cfg.bucket)[rank::world]
        rows = epoch_cache[epoch][k]
        return {key: v.to(device) for key, v in data.collate(enc_train, ds.splits["train"], rows, pad,
                                                                     model.his_len).items()}

    def evaluate():
        scores = metrics.score_rows(model, enc_eval, ds.splits[cfg.eval_split], eval_rows, ebs, pad, device,
                                    dtype, rank, world)
        return metrics.report(ds.splits[cfg.eval_split], scores, eval_rows)["all"]

    def save(name, with_state):
        ckpt = {"config": asdict(cfg), **model_tensors(model), "step": step, "best": best}
        if with_state:
            ckpt.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), bad_evals=bad_evals,
                        history=history)
        save_atomic(ckpt, os.path.join(out, name))

    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"{cfg.stage}", disable=not master, dynamic_ncols=True)
    stop, window_t, window_rows, loss_sum = False, time.time(), 0, 0.0
    model.train()
    while step < cfg.max_steps and not stop:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Dropout noise is a function of (seed, step, rank): a resumed run draws exactly the same.
        torch.manual_seed(cfg.seed + 1_000_003 * (step * world + rank + 1))
        for k in range(cfg.grad_accum):
            batch = micro_batch(step * cfg.grad_accum + k)
            last_micro = k == cfg.grad_accum - 1
            # Only the last micro-batch of a step all-reduces gradients across ranks.
            with (net.no_sync() if world > 1 and not last_micro else nullcontext()), autocast(device, dtype):
                score = net(**batch)                               # (B,) Yes-logits
                loss = F.binary_cross_entropy_with_logits(score, batch["label"])
            # Divide by the accumulation count so the summed gradient is the mean over the global batch.
            scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            window_rows += len(score)
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable.values(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 and master:
            rate = window_rows * world / (time.time() - window_t)
            bar.write(f"step {step:>6} | loss {loss_sum / cfg.log_every:.4f} | lr {lr:.2e} | {rate:.1f} samples/s")
            bar.set_postfix(loss=f"{loss_sum / cfg.log_every:.4f}")
            window_t, window_rows, loss_sum = time.time(), 0, 0.0
        elif step % cfg.log_every == 0:
            window_t, window_rows, loss_sum = time.time(), 0, 0.0
        if step % cfg.eval_every == 0 or step == cfg.max_steps or step == cfg.pause_at:
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                res = evaluate()
                history.append({"step": step, **res})
                if res["auc"] > best["auc"]:
                    best, bad_evals = {**res, "step": step}, 0
                    if master:
                        save("best.pt", with_state=False)
                else:
                    bad_evals += 1
                if master:
                    bar.write(f"eval step {step}: {cfg.eval_split} AUC {res['auc']:.4f} UAUC {res['uauc']:.4f} "
                              f"(best {best['auc']:.4f} at {best['step']})")
                # every rank computed the same metrics from the same gathered scores; all-reducing the
                # decision anyway means no rank can ever wait for a collective the others skipped
                stop = all_ranks_agree(bad_evals >= cfg.patience, world, device)
            if master:
                save("last.pt", with_state=True)
            if step == cfg.pause_at:
                break
        model.train()
    bar.close()
    if step == cfg.pause_at and step < cfg.max_steps and not stop:
        if master:
            print(f"paused at step {step}; continue with: python train.py --resume {out}")
        return None

    # Final: reload the best weights and score the test split once.
    best_state = load_checkpoint(os.path.join(out, "best.pt"))
    restore_tensors(model, best_state)
    test_rows = np.arange(len(ds.splits["test"]))[:cfg.test_rows or None]
    enc_test = encode(cfg, ds, tok, "test", model)
    test_scores = metrics.score_rows(model, enc_test, ds.splits["test"], test_rows, ebs, pad, device, dtype, rank, world)
    test = metrics.report(ds.splits["test"], test_scores, test_rows)
    digests = rank_digests(trainable, world)
    valid_block = {k: best[k] for k in ("auc", "uauc", "uauc_users", "rows")}
    result = {"valid": valid_block, "test": test["all"], "test_warm": test["warm"], "test_cold": test["cold"],
              "stage": cfg.stage, "llm": cfg.llm, "rec": cfg.rec if cfg.stage == "cie" else None,
              "dtype": dtype_name, "dtype_reason": dtype_reason, "data_source": ds.source,
              "random_weights": cfg.llm.startswith("random:"),
              "best_step": best["step"], "samples_seen": step * cfg.batch_size * cfg.grad_accum * world,
              "seconds": round(time.time() - t0, 1), "rank_digests": digests, "config": asdict(cfg),
              "history": history}
    if master:
        with open(os.path.join(out, "metrics.json.tmp"), "w") as f:
            json.dump(result, f, indent=1)
        os.replace(os.path.join(out, "metrics.json.tmp"), os.path.join(out, "metrics.json"))
        if result["random_weights"]:
            print(f"warning: --llm {cfg.llm} has random weights: the AUCs below mean nothing (speed and memory only)")
        print(f"{cfg.stage} {cfg.llm}: best step {best['step']}, {cfg.eval_split} AUC {best['auc']:.4f}, "
              f"test AUC {test['all']['auc']:.4f} UAUC {test['all']['uauc']:.4f} (warm {test['warm']['auc']:.4f}, "
              f"cold {test['cold']['auc']:.4f}), {result['seconds']:.0f}s -> {os.path.join(out, 'best.pt')}")
    if world > 1:
        dist.destroy_process_group()
    return result


def calibrate(model, enc, split, batch_size, pad, device, dtype, seed, n=256):
    """--calibrate: score n random train rows with the model as it starts and shift every score by
    the constant that brings their mean logit to the logit of train's positive rate. Without it a
    small LLM's first steps are spent moving all its scores down together (SmolLM2's first loss
    is ~4.7 where a calibrated model starts near 0.69). Whether that helps ranking is an open
    question: in a 2,000-sample stage-1 run on SmolLM2 it did not (see the README's Run section).
    Every rank draws the same rows (the seed), so every rank sets the same constant. -> the shift."""
    rows = np.sort(np.random.default_rng(seed).choice(len(split), min(n, len(split)), replace=False))
    scores = metrics.score_rows(model, enc, split, rows, batch_size, pad, device, dtype)
    rate = float(split.label.mean())
    shift = math.log(rate / (1 - rate)) - float(scores.mean())
    model.score_bias.add_(shift)
    return shift


def restore_tensors(model, state):
    """Load a checkpoint's trained tensors into an already built model (a frozen rec model never
    changed, so only a tuned one is reloaded)."""
    from peft import set_peft_model_state_dict
    set_peft_model_state_dict(model.llm, state["lora"])
    model.score_bias.fill_(state.get("score_bias", 0.0))
    if model.rec is not None:
        model.proj.load_state_dict(state["proj"])
        if model.tune_rec:
            model.rec.load_state_dict(state["rec"]["state_dict"])


def rank_digests(trainable, world):
    """A hash of the trained weights from every rank. DDP keeps the replicas bit-identical; if they
    ever differ (a parameter unfrozen after wrapping, say), the run says so instead of hiding it."""
    import hashlib
    h = hashlib.sha1()
    for p in trainable.values():
        h.update(p.detach().float().cpu().numpy().tobytes())
    digests = [h.hexdigest()]
    if world > 1:
        digests = [None] * world
        dist.all_gather_object(digests, h.hexdigest())
    if len(set(digests)) > 1:
        print(f"warning: trained weights differ across ranks: {digests}")
    return digests


def all_ranks_agree(flag, world, device):
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def main(argv=None):
    cfg = parse_config(argv)
    train(cfg)


if __name__ == "__main__":
    data.cli_main(main)
