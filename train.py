"""train.py: one plain PyTorch loop for both CoLLM training stages (paper section 3.3).

    python train.py --stage lora --out runs/lora                       # stage 1: LoRA on text prompts (= TALLRec)
    python train.py --stage cie --ckpt runs/lora/best.pt \\
                    --rec mf --rec-ckpt runs/mf/model.pt --out runs/cie  # stage 2: the projector ("CIE")
    torchrun --nproc-per-node 8 train.py --stage lora ...               # the same on 8 GPUs (DDP)
    python tools/use.py --ckpt runs/cie/best.pt --split test            # score a saved run

What each stage trains is collm.STAGES: stage 1 LoRA on titles-only prompts; stage 2 the projector of a
frozen collaborative model's (collab.py) vectors into two prompt slots, plus that model with `--tune-rec`
(from `--rec-ckpt`, or from scratch) and stage 1's LoRA with `--tune-lora`. The loop: AdamW, warmup then
cosine decay by the global step, gradient accumulation, clipping, bf16/fp16 autocast; every `--eval-every`
steps a fixed valid subset is scored, the best-AUC checkpoint kept, and the run stops after `--patience`
evaluations without improvement; the best is then scored on test (metrics.json). Checkpoints hold only the
small tensors, never the LLM, written atomically; `--resume DIR` continues a stopped run exactly.

Chapter five, in the order a run happens: settings (Config), devices and precision, checkpoints and
build_model, the schedule and optimizer, the loop (set_up, train_step, evaluate_and_save, finish, train).
"""
import argparse
import json
import math
import os
import signal
import sys
import threading
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
import eval as metrics  # our eval.py, by what it holds (a plain `import eval` would hide the builtin)
from data import UsageError

# ---------------------------------------------------------------------------------------------
# Settings: one dataclass, and the command line is generated from it (help text lives here)


def opt(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


DATA_FLAGS = data.DATA_FLAGS  # --data and --data-root, worded as every CLI words them
# --help shows the settings in these groups, each opening at the field named here (Config's order)
HELP_GROUPS = {"stage": "the run: the flags a newcomer sets",
               "rec": "stage 2's switches (--stage cie)",
               "lora_r": "the LoRA adapters (stage 1 trains them; stage 2 reads their shape from --ckpt)",
               "grad_accum": "optimisation",
               "eval_split": "evaluation and early stopping",
               "template": "the rest: prompts, seeds, logs, sittings, memory"}


@dataclass
class Config:
    """Every setting of a run: --help is generated from the fields (their help text lives here), and
    each checkpoint saves them all, which --resume and tools/use.py rebuild the run from."""
    stage: str = opt("lora", "lora: stage 1, LoRA on text-only prompts (TALLRec); cie: stage 2, the projector",
                     choices=("lora", "cie"))
    llm: str = opt("smollm2-135m", "smollm2-135m | gemma3-270m (real LLMs from pip packages, README) | tiny | "
                                   "tiny-gemma3 (tests) | a model folder | a hub id (e.g. lmsys/vicuna-7b-v1.3) | "
                                   "random:vicuna-7b, random:qwen2-1.5b, random:smollm2-135m, random:gemma3-270m (the "
                                   "real shapes with random weights: speed and memory only)")
    out: str = opt(None, "output folder for best.pt, last.pt, metrics.json (default runs/<stage>)")
    resume: str = opt(None, "continue the run saved in this folder (its last.pt and settings)")
    ckpt: str = opt(None, "stage 2: the stage-1 checkpoint whose LoRA is loaded (and frozen unless --tune-lora): "
                          "its best.pt, or an --export folder of it such as checkpoints/tallrec-smollm2")
    rec_ckpt: str = opt(None, "stage 2: a collab.py model.pt (frozen unless --tune-rec); the reference's "
                              "pretrained_path")
    data: str = opt(*DATA_FLAGS["data"])
    data_root: str = opt(*DATA_FLAGS["data_root"])
    max_steps: int = opt(1750, "optimizer steps; also the length of the cosine schedule (the defaults are the "
                               "recipe of the shipped SmolLM2 stage-1 checkpoint, docs/RESULTS.md)")
    batch_size: int = opt(8, "rows per micro-batch per process (the reference: 16 per GPU)")
    lr: float = opt(1e-3, "peak learning rate (the reference's ML-1M value for both stages)")
    eval_every: int = opt(250, "evaluate (and save last.pt) every N steps (the reference: 50, its 'epoch')")
    device: str = opt("auto", "auto (cuda if available) | cpu | cuda", choices=("auto", "cpu", "cuda"))
    dtype: str = opt("auto", "compute dtype; auto = what the hardware computes natively: bf16 on GPUs and CPUs "
                             "with bf16 units (AVX-512 BF16/AMX), fp16 on older GPUs, fp32 on other CPUs",
                     choices=("auto", "bf16", "fp16", "fp32"))
    compile: bool = opt(False, "torch.compile each decoder layer (collm.compile_decoder): on CPU faster steps "
                        "and less activation memory (bench.py --compile measures both), after tens of "
                        "seconds of compiling")
    rec: str = opt("mf", "stage 2: the collaborative model (default: the one --rec-ckpt holds, else mf)",
                   choices=tuple(k for k, m in collab.MODELS.items() if "dim" in m.defaults))  # pop has none
    tune_rec: bool = opt(False, "stage 2: train the collaborative model too, the paper's whole-CIE tuning "
                                "(section 5.3.2; the reference's freeze_rec: False): from --rec-ckpt, or from "
                                "scratch without it")
    tune_lora: bool = opt(False, "stage 2: train stage 1's LoRA on too (the reference's freeze_lora: False); the "
                                 "whole prompt then runs with gradients, as in stage 1, so a step costs more")
    lora_r: int = opt(8, "LoRA rank (stage 2 takes this and the other --lora-* settings from --ckpt)")
    lora_alpha: int = opt(16, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input")
    lora_targets: str = opt("q_proj,v_proj", "comma-separated module names that get LoRA")
    lora_layers: int = opt(0, "LoRA in the top N decoder layers only; the layers below then run forward-only "
                              "(0 = every layer, the paper's)")
    grad_accum: int = opt(1, "micro-batches per optimizer step (global batch = batch * accum * processes)")
    min_lr: float = opt(8e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(50, "linear warmup length in optimizer steps (the reference: 200)")
    warmup_start_lr: float = opt(1e-5, "learning rate at step 0")
    weight_decay: float = opt(1e-3, "AdamW weight decay, on matrices only (not biases)")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    bucket: bool = opt(True, "group rows of similar length into batches (under 5%% padding)")
    calibrate: bool = opt(True, "stage 1: before the first step, shift the score by a constant so that the mean "
                                "logit on 256 train rows is the logit of the train positive rate (a small LLM's "
                                "untrained 'Yes' logit is far off, and its first steps would only move it); AUC is "
                                "unchanged by it, and stage 2 starts from stage 1's shift (--no-calibrate: the "
                                "reference's start)")
    eval_split: str = opt("valid_small", "split used for model selection", choices=("valid_small", "valid"))
    eval_rows: int = opt(1000, "score only the first N rows of --eval-split while training (0 = all 5,200 of "
                               "valid_small, the reference's; 1,000 keeps each evaluation short on a CPU)")
    eval_batch_size: int = opt(0, "rows per scoring batch (0 = twice --batch-size)")
    test_rows: int = opt(0, "score only the first N test rows at the end (0 = all)")
    patience: int = opt(20, "stop after this many evaluations without a better valid AUC")
    template: str = opt(None, "prompt template file (default prompts/<domain>_<text|collm>.txt)")
    seed: int = opt(2023, "seed for initialisation, batch order and dropout")
    log_every: int = opt(10, "print a log line every N steps")
    pause_at: int = opt(0, "end this sitting after N steps with last.pt saved; --resume continues (0 = off)")
    cache_dir: str = opt("cache", "where converted models (SmolLM2's safetensors copy) are kept")
    grad_checkpoint: bool = opt(False, "activation checkpointing of the decoder layers: each layer's activations are "
                                       "recomputed in the backward instead of kept (about 1/3 more compute, far less "
                                       "memory: for GPUs too small for a batch)")


def parse_config(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="python tools/use.py --help: scoring, exporting and ranking with a saved run")
    for f in fields(Config):
        group = p.add_argument_group(HELP_GROUPS[f.name]) if f.name in HELP_GROUPS else group
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:  # --compile / --no-compile
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:  # int, float or str: argparse converts the text with the field's own type; --rec None = not given
            group.add_argument(flag, type=f.type, default=None if f.name == "rec" else f.default,
                               help=f.metadata["help"], choices=f.metadata.get("choices"))
    args = p.parse_args(argv)
    cfg = Config(**{**vars(args), "rec": args.rec or Config.rec})
    if cfg.resume:
        cfg = resume_config(cfg)
    elif cfg.stage == "cie" and cfg.rec_ckpt:
        cfg = replace(cfg, rec=rec_of(cfg.rec_ckpt, args.rec))
    check_config(cfg)
    if cfg.stage == "cie" and not cfg.resume:
        # Stage 2 loads stage 1's adapters, so their shape is stage 1's whatever this command says;
        # recorded in this run's settings, so that --resume and tools/use.py rebuild the same shape.
        saved = load_stage1(cfg.ckpt).get("config", {})
        cfg = replace(cfg, **{k: saved[k] for k in LORA_SHAPE if k in saved})
    return cfg


def rec_of(rec_ckpt, given):
    """--rec is what --rec-ckpt holds, refused if `given` (--rec, or None) differs; if the file can't tell, --rec."""
    held = collab.model_in(rec_ckpt)
    if held is None:
        return given or Config.rec
    if given is not None and given != held:
        raise UsageError(f"--rec-ckpt {rec_ckpt}: a {held} model, but --rec is {given}; leave --rec out, it is "
                         f"read from --rec-ckpt")
    return held


LORA_SHAPE = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_layers")


def command_line(cfg, world=1):
    """The shortest command that makes this run again (metrics.json keeps it): the non-default settings."""
    flags = []
    for f in fields(Config):
        value = getattr(cfg, f.name)
        if value == f.default or f.name in ("resume", "pause_at"):  # sittings, not settings
            continue
        flag = "--" + f.name.replace("_", "-")
        flags.append((flag if value else "--no-" + flag[2:]) if f.type is bool else f"{flag} {value}")
    launcher = f"torchrun --nproc-per-node {world} train.py" if world > 1 else "python train.py"
    return " ".join([launcher, *flags])


# Every numeric setting, by what its 0 means: >= 1 where 0 means nothing (0 steps, a batch of 0), >= 0
# where it means "all", "off" or "the default". A negative count would be worse than an error:
# `rows[:-1]` is Python's "all but the last", so --test-rows -1 would score the wrong rows silently.
AT_LEAST_1 = ("batch_size", "grad_accum", "max_steps", "eval_every", "patience", "log_every", "lora_r", "lora_alpha")
AT_LEAST_0 = ("eval_batch_size", "eval_rows", "test_rows", "warmup_steps", "pause_at", "lora_layers", "seed",
              "weight_decay", "grad_clip")


def check_config(cfg):
    """Report every bad setting at once, before anything slow happens."""
    flag = lambda name: f"--{name.replace('_', '-')}"  # lora_r -> --lora-r
    problems = [f"{flag(n)} must be >= 1 (got {getattr(cfg, n)})" for n in AT_LEAST_1 if not getattr(cfg, n) >= 1]
    # `not x >= 0` rather than `x < 0`: a float NaN fails every comparison, and is refused too
    problems += [f"{flag(n)} must be >= 0 (got {getattr(cfg, n)})" for n in AT_LEAST_0 if not getattr(cfg, n) >= 0]
    problems += [f"{flag(n)} must be > 0 (got {getattr(cfg, n)})" for n in ("lr", "min_lr", "warmup_start_lr")
                 if not getattr(cfg, n) > 0]
    if not 0 <= cfg.lora_dropout < 1:
        problems.append(f"--lora-dropout must be in [0, 1) (got {cfg.lora_dropout})")
    if cfg.stage == "cie" and not cfg.ckpt:
        problems.append("--stage cie needs --ckpt, the stage-1 checkpoint (e.g. runs/lora/best.pt)")
    if not collm.known_llm(cfg.llm):  # before the run folder exists: a typo leaves nothing behind
        problems.append(f"--llm {cfg.llm}: not {', '.join(collm.NAMED)}, random:NAME, a model folder here or a hub "
                        f"id (owner/name)")
    if cfg.stage == "cie" and cfg.rec == "pop":
        problems.append("--rec pop: the popularity baseline has no user or item embeddings to put in CoLLM's "
                        "slots; use mf, lightgcn, sasrec or din")
    for name in ("tune_rec", "tune_lora"):
        if cfg.stage == "lora" and getattr(cfg, name):
            problems.append(f"--{name.replace('_', '-')} is a stage-2 switch (--stage cie); stage 1 trains LoRA alone")
    if cfg.stage == "cie" and not cfg.rec_ckpt and not cfg.tune_rec:
        problems.append("--stage cie needs --rec-ckpt (a collab.py model.pt), or --tune-rec to train one from scratch")
    for name in ("ckpt", "rec_ckpt"):  # --ckpt may also be an export folder (load_stage1)
        path = getattr(cfg, name)
        if path and not (os.path.isfile(path) or (name == "ckpt" and os.path.isdir(path))):
            problems.append(f"--{name.replace('_', '-')} {path}: file not found")
    if problems:
        raise UsageError("; ".join(problems))


def resume_config(cfg):
    """--resume DIR: the saved settings win (the schedule depends on them); only `pause_at` is new."""
    path = os.path.join(cfg.resume, "last.pt")
    if not os.path.isfile(path):
        raise UsageError(f"--resume {cfg.resume}: no last.pt there")
    saved = load_checkpoint(path, LAST_KEYS)["config"]
    return Config(**{**saved, "resume": cfg.resume, "pause_at": cfg.pause_at, "out": cfg.resume})


# ---------------------------------------------------------------------------------------------
# Processes, devices and precision


def setup_distributed(cfg):
    """-> (rank, world, device). Plain `python train.py` is world 1; torchrun sets RANK/WORLD_SIZE."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")  # gloo is the CPU backend
    return rank, world, device


# Which dtype to compute in. Half precision halves memory and, on hardware built for it, multiplies
# matmul speed; on a CPU without bf16 matrix units (AVX2 only: most laptops) bf16 matmuls run hundreds
# of times slower than fp32 (docs/SPEED.md). So `--dtype auto` picks what the hardware computes natively.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}  # None = plain fp32, no autocast
BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX-512 BF16 / AMX, Arm's BF16 extension
CPUINFO = "/proc/cpuinfo"


def cpu_has_bf16_units():
    """True when the CPU flags have bf16 matrix instructions AND oneDNN may use them (its own check says
    yes for any AVX-512 CPU, but obeys ONEDNN_MAX_CPU_ISA). No /proc/cpuinfo: False, fp32 is never wrong."""
    try:
        with open(CPUINFO) as f:
            flags = {w for line in f if line.startswith(("flags", "Features")) for w in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return bool(flags & BF16_CPU_FLAGS) and onednn_runs_bf16()


def onednn_runs_bf16():
    """oneDNN's own answer: False where ONEDNN_MAX_CPU_ISA caps it below the bf16 instructions."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN: the flags alone decide
        return True


def native_dtype(device):
    """-> (dtype name, reason): the fastest dtype this device computes natively."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "the GPU computes bf16"
        return "fp16", "the GPU has no bf16 (fp16 with loss scaling)"
    if cpu_has_bf16_units():
        return "bf16", "the CPU has bf16 matrix units (AVX-512 BF16 / AMX)"
    return "fp32", "the CPU has no bf16 matrix units torch may use, without which bf16 runs ~500x slower than fp32"


def compute_dtype(choice, device):
    """--dtype -> (torch dtype or None for fp32, name, reason); a half dtype the CPU lacks units for warns."""
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
# Checkpoints: a run's settings and small trained tensors (collm.model_tensors), written atomically;
# and the model a stage's settings describe (build_model), built alike by a run, --resume and tools/use.py

# What each use of a checkpoint needs: scoring the tensors and settings; --resume also last.pt's state.
BEST_KEYS = ("config", "lora", "step")
LAST_KEYS = BEST_KEYS + ("optimizer", "scaler", "best", "bad_evals", "history", "loss_log", "log_window", "seconds", "world")


def load_checkpoint(path, need=()):
    """A train.py checkpoint, checked: a fault (empty, truncated, damaged, lacking `need`) is one line naming it."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{path}: empty (0 bytes): a copy or a write that never finished")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint, a pickle from elsewhere
        why = (str(e).strip().splitlines() or [""])[0][:120]  # some exceptions carry no message at all
        raise UsageError(f"{path}: {unreadable(path)} ({type(e).__name__}: {why})")
    if not isinstance(state, dict):
        raise UsageError(f"{path}: holds a {type(state).__name__}, not a train.py checkpoint")
    # torch.load does not check the zip's checksums: flipped bytes inside a tensor load as other
    # numbers, silently. So every checkpoint carries a digest of its tensors (save), checked here.
    if "digest" not in state:  # e.g. a collab.py model.pt given where a train.py checkpoint belongs
        what = f"a collab.py {state['model']} model.pt" if "model" in state and "state_dict" in state else \
            "no digest of its tensors in it"
        raise UsageError(f"{path}: {what}; not a train.py checkpoint (best.pt or last.pt; a collaborative model "
                         f"goes to --rec-ckpt)")
    if state["digest"] != tensor_digest(tensors_in({**state, "digest": None})):
        raise UsageError(f"{path}: damaged: its tensors do not match the digest saved with them (bytes changed "
                         f"on disk or in a copy); use another copy of the run")
    missing = [k for k in need if k not in state]
    if "optimizer" in missing and "lora" in state:
        raise UsageError(f"{path}: weights only, no optimizer state (a best.pt?); --resume continues from the "
                         f"last.pt that train.py saves at every evaluation")
    if missing:
        raise UsageError(f"{path}: no {', '.join(missing)} in it; not a train.py checkpoint (best.pt or last.pt)")
    return state


def write_checkpoint(ckpt, path):
    """torch.save a checkpoint dict atomically, with the digest of its tensors load_checkpoint checks."""
    ckpt["digest"] = tensor_digest(tensors_in(ckpt))
    data.write_atomic(path, lambda tmp: torch.save(ckpt, tmp))


def unreadable(path):
    """Why torch could not read a file: a zip's signature (torch.save's format) without its end = cut short."""
    import zipfile
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return f"truncated ({os.path.getsize(path):,} bytes, the end of the file is missing)"
    return "not a train.py checkpoint"


def tensors_in(obj):
    """Every tensor inside nested dicts and lists, in their stored order (kept by pickling)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (dict, list, tuple)):
        for v in obj.values() if isinstance(obj, dict) else obj:
            yield from tensors_in(v)


def tensor_digest(tensors):
    """A SHA-1 of tensors' dtypes, shapes and raw bytes: equal iff the tensors are bit for bit equal."""
    import hashlib
    h = hashlib.sha1()
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
    return h.hexdigest()


def load_stage1(path):
    """Stage 2's --ckpt: a stage-1 best.pt, or an --export folder of one (the shipped checkpoints/)."""
    if not os.path.isdir(path):
        return load_checkpoint(path)
    state = collm.load_export(path)
    # stage 2 checks the LLM by the --llm the run trained with, not by load_export's base/ copy
    with open(os.path.join(path, collm.EXPORT_JSON)) as f:
        state["config"]["llm"] = json.load(f)["llm"]
    return state


def build_model(cfg, data_set, dtype, state=None):
    """-> (CoLLM, tokenizer) with `state`'s tensors (resume, scoring), or stage 2's from --ckpt and --rec-ckpt."""
    from peft import set_peft_model_state_dict
    stage1 = None
    if cfg.stage == "cie" and state is None:
        stage1 = load_stage1(cfg.ckpt)
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
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    yes = collm.yes_token_id(tok)
    llm = collm.add_lora(llm, lora_cfg["lora_r"], lora_cfg["lora_alpha"], lora_cfg["lora_dropout"],
                         lora_cfg["lora_targets"].split(","), lora_cfg.get("lora_layers", 0))
    lora = (state or stage1 or {}).get("lora")
    if lora is not None:
        result = set_peft_model_state_dict(llm, lora)
        if getattr(result, "unexpected_keys", None):
            raise UsageError(f"{cfg.ckpt or cfg.resume}: LoRA tensors do not fit --llm {cfg.llm}")
    rec = None
    if collm.STAGES[cfg.stage]["rec"]:  # stage 2 reads a collaborative model
        if state is not None:
            rec = collab.rec_from_checkpoint(state["rec"], data_set.user_num, data_set.item_num, "checkpoint")
        elif cfg.rec_ckpt:
            rec = collab.load_rec(cfg.rec_ckpt, data_set.user_num, data_set.item_num, data.fingerprint(data_set))
        else:  # --tune-rec from scratch
            rec = collab.new_rec(cfg.rec, data_set)
        if collab.model_name(rec) != cfg.rec:  # a DIN checkpoint would fill the slots of a run that says MF
            raise UsageError(f"--rec-ckpt {cfg.rec_ckpt or cfg.resume}: a {collab.model_name(rec)} model, but "
                             f"--rec is {cfg.rec}")
    model = collm.CoLLM(llm, yes, rec, tune_rec=cfg.tune_rec)
    model.score_bias.fill_((state or stage1 or {}).get("score_bias", 0.0))  # stage 2 starts from stage 1's
    if state is not None and rec is not None:
        model.proj.load_state_dict(state["proj"])
    collm.set_trainable(model, cfg.stage, cfg.tune_rec, cfg.tune_lora)  # collm.STAGES says what trains
    return model, tok


# ---------------------------------------------------------------------------------------------
# The schedule and the optimizer (bench.py builds its own with these too, so both take the same steps).
# Learning rate: warmup then cosine, a pure function of the GLOBAL step (the reference restarted its
# warmup every 'epoch', a sawtooth)


def lr_at(step, cfg):
    if step < cfg.warmup_steps:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(params, cfg):
    """AdamW, decaying matrices only (as nanoGPT and the reference): on biases and norm scales it only shifts."""
    params = list(params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999))


# ---------------------------------------------------------------------------------------------
# The loop: set_up() builds a Run, train_step() takes one optimizer step, evaluate_and_save() and
# finish() keep what it learned; train() at the end calls them in order.


@dataclass
class LoopState:
    """What the loop moves from step to step, which last.pt keeps (saved(), restore()) for --resume."""
    step: int = 0             # optimizer steps taken: the clock of the schedule, evaluation, saving
    best: dict = field(default_factory=lambda: {"auc": -1.0, "step": 0})
    bad_evals: int = 0        # evaluations since the best one (early stop at --patience)
    history: list = field(default_factory=list)   # every evaluation's metrics
    loss_log: list = field(default_factory=list)  # the logged training losses (tools/results.py --plot)
    # what the next log line averages: this window's summed step losses, steps, rows, start time
    window: dict = field(default_factory=lambda: {"t": time.time(), "rows": 0, "loss": 0.0, "steps": 0})
    t0: float = field(default_factory=time.time)  # when the run began, less earlier sittings' wall time

    def saved(self):
        """last.pt's loop entries (step and best go into best.pt too, see save)."""
        return dict(bad_evals=self.bad_evals, history=self.history, loss_log=self.loss_log,
                    seconds=time.time() - self.t0, log_window={"loss": self.window["loss"], "steps": self.window["steps"]})

    def restore(self, state):
        """--resume: the loop as the paused sitting left it."""
        self.step, self.best, self.bad_evals = state["step"], state["best"], state["bad_evals"]
        self.history, self.loss_log = state["history"], state["loss_log"]
        self.window.update(state["log_window"])  # the next log line averages all of the window's steps
        self.t0 -= state["seconds"]  # metrics.json's seconds: every sitting's wall time, summed


@dataclass
class Run:
    """What set_up() builds for one run, shared by the loop's chapters; `loop` is the part that changes."""
    cfg: Config
    rank: int                 # this process's place among `world` (0 logs and saves; every rank computes)
    world: int
    device: torch.device
    dtype: object             # the autocast dtype; None = plain fp32
    dtype_name: str
    dtype_reason: str
    out: str                  # the folder of best.pt, last.pt, metrics.json
    ds: data.Dataset
    tok: object
    model: collm.CoLLM        # evaluated and saved as it is
    net: torch.nn.Module      # what the loop calls: the model, or its DDP wrapper under torchrun
    trainable: dict           # name -> the parameters this stage trains
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    enc_train: data.Encoded
    enc_eval: data.Encoded
    pad: int
    eval_rows: np.ndarray     # the rows of --eval-split scored at each evaluation
    eval_batch_size: int
    batches_per_rank: int     # micro-batches per epoch on each rank
    loop: LoopState
    epoch_cache: dict = field(default_factory=dict)  # one epoch's batch list (micro_batch)
    lock: object = None       # rank 0's open lock file on `out` (claim_folder)

    @property
    def master(self):
        return self.rank == 0

    @property
    def samples_per_step(self):  # the global batch: what the learning rate is tuned for
        return self.cfg.batch_size * self.cfg.grad_accum * self.world


def set_up(cfg):
    """Chapter 1: processes, data, the model and its optimizer; resuming, the loop state of last.pt."""
    t0 = time.time()
    rank, world, device = setup_distributed(cfg)
    out = cfg.out or os.path.join("runs", cfg.stage)
    lock = claim_folder(cfg, out) if rank == 0 else None  # only rank 0 writes the folder
    dtype, dtype_name, dtype_reason = compute_dtype(cfg.dtype, device)
    if rank == 0:  # what the run will do, before anything slow (loading, calibration) happens
        print(f"=> {collm.STAGES[cfg.stage]['what']} on --llm {cfg.llm}: {cfg.max_steps:,} steps of "
              f"{cfg.batch_size * cfg.grad_accum * world} rows into {out}, on {device} in {dtype_name} ({dtype_reason})"
              f"{rough_length(cfg, device, dtype_name, world)}; Ctrl-C saves last.pt and says how to resume", flush=True)
    state = load_checkpoint(os.path.join(cfg.resume, "last.pt"), LAST_KEYS) if cfg.resume else None
    if state is not None:
        check_same_world(state, cfg, world)
    torch.manual_seed(cfg.seed)  # identical LoRA/projector init on every rank
    ds = data.load_dataset(cfg.data, cfg.data_root)
    eval_rows = np.arange(len(ds.splits[cfg.eval_split]))[:cfg.eval_rows or None]
    metrics.check_both_classes(ds.splits[cfg.eval_split], eval_rows,
                               f"--eval-split {cfg.eval_split} --eval-rows {cfg.eval_rows}")
    metrics.check_both_classes(ds.splits["test"], np.arange(len(ds.splits["test"]))[:cfg.test_rows or None],
                               f"--test-rows {cfg.test_rows}")
    model, tok = build_model(cfg, ds, dtype, state)
    enc_train, enc_eval = (collm.encode(cfg, ds, tok, split, model) for split in ("train", cfg.eval_split))
    model.to(device)
    if cfg.compile:
        collm.compile_decoder(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # DDP syncs the parameters that require grad when it is built: freeze (build_model), then wrap.
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    # fp16 has so few exponent bits that small gradients underflow to 0: the scaler multiplies the
    # loss before the backward and divides the gradients after. bf16 and fp32 need no scaling.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    # Each epoch's batch list is a function of (seed, epoch), identical on every rank, and rank r
    # takes every world-th batch: any step's batch can be recomputed, so a resume needs no data state.
    n_batches = len(data.train_batches(enc_train.lengths, cfg.batch_size, np.random.default_rng(0), False))
    run = Run(cfg=cfg, rank=rank, world=world, device=device, dtype=dtype, dtype_name=dtype_name,
              dtype_reason=dtype_reason, out=out, ds=ds, tok=tok, lock=lock, model=model, net=net, trainable=trainable,
              optimizer=build_optimizer(trainable.values(), cfg), scaler=scaler, enc_train=enc_train, enc_eval=enc_eval,
              pad=data.SegmentTokenizer(tok).pad_id, eval_rows=eval_rows, batches_per_rank=n_batches // world,
              eval_batch_size=cfg.eval_batch_size or 2 * cfg.batch_size, loop=LoopState(t0=t0))
    if state is not None:
        restore_loop_state(run, state)
    if cfg.calibrate and state is None and cfg.stage == "lora":
        shift = calibrate(model, enc_train, ds.splits["train"], run.eval_batch_size, run.pad, device, dtype, cfg.seed)
        if run.master:
            print(f"calibrated: every score shifted by {shift:+.3f} (now {float(model.score_bias):+.3f})")
    if run.master:
        print(f"=> ready: stage {cfg.stage} | llm {cfg.llm} | processes {world} | global batch {run.samples_per_step} "
              f"| trainable {sum(p.numel() for p in trainable.values()):,} in {len(trainable)} tensors")
    return run


# Seconds per training row (scoring included) of the real small LLMs on a 2-core CPU, by dtype
# (docs/SPEED.md): only for the first line's rough length; tqdm's bar gives the real one.
CPU_SECONDS_PER_ROW = {"bf16": 0.44, "fp32": 0.95}


def rough_length(cfg, device, dtype_name, world):
    """', about N h on a 2-core CPU' for the real small LLMs on a CPU, else '' (no basis for a guess)."""
    if device.type != "cpu" or cfg.llm not in collm.PRETRAINED or dtype_name not in CPU_SECONDS_PER_ROW:
        return ""
    seconds = cfg.max_steps * cfg.batch_size * cfg.grad_accum * CPU_SECONDS_PER_ROW[dtype_name]
    length = f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"
    return f", about {length} on a 2-core CPU"


RUN_FILES = ("best.pt", "last.pt", "metrics.json")  # what a run writes into its folder
LOCK_FILE = "train.lock"


def claim_folder(cfg, out):
    """One run per folder: an exclusive flock on out/train.lock (dropped however the process ends), and a new
    run refuses another run's files (no old metrics.json beside a new best.pt). -> the open lock file."""
    import fcntl
    os.makedirs(out, exist_ok=True)
    lock = open(os.path.join(out, LOCK_FILE), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise UsageError(f"--out {out}: a running train.py (pid {holder}) holds this folder; wait for it to end, "
                         f"or use another folder")
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")  # who holds it, for the message above
    lock.flush()
    theirs = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if theirs and not cfg.resume:
        lock.close()
        raise UsageError(f"--out {out} holds another run's {', '.join(theirs)}; continue that run with --resume "
                         f"{out}, or start this one in another folder")
    return lock


def check_same_world(state, cfg, world):
    """--resume needs last.pt's process count: the global batch and each step's rows depend on it."""
    saved = state["world"]
    if saved != world:
        run_it = f"torchrun --nproc-per-node {saved} train.py" if saved > 1 else "python train.py"
        raise UsageError(f"--resume {cfg.resume}: last.pt was written by {saved} process(es), this run has {world}; "
                         f"another count changes the global batch and the data order: run {run_it} --resume {cfg.resume}")


def restore_loop_state(run, state):
    """--resume: the optimizer's moments and the loop state, as the paused sitting left them."""
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    run.loop.restore(state)


def micro_batch(run, m):
    """The m-th micro-batch of this rank, counted from the start of the run, on the device."""
    epoch, k = divmod(m, run.batches_per_rank)
    if epoch not in run.epoch_cache:  # one epoch's list at a time
        run.epoch_cache.clear()
        rng = np.random.default_rng([run.cfg.seed, epoch])
        run.epoch_cache[epoch] = data.train_batches(run.enc_train.lengths, run.cfg.batch_size, rng,
                                                    run.cfg.bucket)[run.rank::run.world]
    rows = run.epoch_cache[epoch][k]
    batch = data.collate(run.enc_train, run.ds.splits["train"], rows, run.pad, run.model.his_len)
    return {key: v.to(run.device) for key, v in batch.items()}


def train_step(run, window):
    """Chapter 2: one optimizer step over a global batch; adds rows and mean loss to `window`. -> the lr."""
    cfg = run.cfg
    # The schedule is a pure function of the global step, so a resumed run continues on the same curve.
    lr = lr_at(run.loop.step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    # Dropout noise is a function of (seed, step, rank): a resumed run draws exactly the same.
    torch.manual_seed(cfg.seed + 1_000_003 * (run.loop.step * run.world + run.rank + 1))
    # Gradient accumulation: the micro-batches' gradients sum in .grad, a big batch in a small one's memory.
    for k in range(cfg.grad_accum):
        batch = micro_batch(run, run.loop.step * cfg.grad_accum + k)
        # Under DDP every backward all-reduces the gradients across ranks; only the last micro-batch's
        # needs to (the sum is what counts), so the others run inside no_sync() and skip the traffic.
        sync = run.net.no_sync() if run.world > 1 and k < cfg.grad_accum - 1 else nullcontext()
        with sync, autocast(run.device, run.dtype):
            score = run.net(**batch)                               # (B,) Yes-logits
            loss = F.binary_cross_entropy_with_logits(score, batch["label"])
        # Divide by the accumulation count so the summed gradient is the mean over the global batch.
        run.scaler.scale(loss / cfg.grad_accum).backward()
        window["loss"] += loss.item() / cfg.grad_accum
        window["rows"] += len(score)
    if cfg.grad_clip > 0:
        # The whole gradient's norm: a rare huge gradient (a fresh projector) cannot throw the weights far.
        # Unscaled first, so the threshold is in true gradient units.
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.trainable.values(), cfg.grad_clip)
    run.scaler.step(run.optimizer)  # skips the step if fp16 gradients overflowed, and lowers the scale
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.loop.step += 1
    window["steps"] += 1
    return lr


def log_step(run, bar, lr, window):
    """Every --log-every steps: rank 0 prints the mean loss and the speed of the last window."""
    cfg = run.cfg
    if run.loop.step % cfg.log_every != 0:
        return
    if run.master:
        loss = window["loss"] / window["steps"]  # after a resume, the steps before it count too (log_window)
        rate = window["rows"] * run.world / (time.time() - window["t"])
        bar.write(f"step {run.loop.step:>6} | loss {loss:.4f} | lr {lr:.2e} | {rate:.1f} samples/s")
        bar.set_postfix(loss=f"{loss:.4f}")
        run.loop.loss_log.append({"step": run.loop.step, "loss": loss})
    window.update(t=time.time(), rows=0, loss=0.0, steps=0)


def save(run, name, with_state):
    """best.pt: the trained tensors and settings; last.pt also the optimizer and loop state (--resume)."""
    loop = run.loop
    ckpt = {"config": asdict(run.cfg), **collm.model_tensors(run.model), "step": loop.step, "best": loop.best,
            "samples_seen": loop.step * run.samples_per_step}  # what these weights learned from
    if with_state:  # world: the process count the data order and the global batch depend on
        ckpt.update(optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(), **run.loop.saved(),
                    world=run.world)
    write_checkpoint(ckpt, os.path.join(run.out, name))


def evaluate_and_save(run, bar):
    """Chapter 3: score the valid rows, keep the best checkpoint. -> True when the run should stop early."""
    cfg = run.cfg
    split = run.ds.splits[cfg.eval_split]
    scores = metrics.score_rows(run.model, run.enc_eval, split, run.eval_rows, run.eval_batch_size, run.pad,
                                run.device, run.dtype, run.rank, run.world)
    res = metrics.report(split, scores, run.eval_rows)["all"]
    run.loop.history.append({"step": run.loop.step, **res})
    if res["auc"] > run.loop.best["auc"]:
        run.loop.best, run.loop.bad_evals = {**res, "step": run.loop.step}, 0
        if run.master:
            save(run, "best.pt", with_state=False)
    else:
        run.loop.bad_evals += 1
    if run.master:
        bar.write(f"eval step {run.loop.step}: {cfg.eval_split} AUC {res['auc']:.4f} UAUC {res['uauc']:.4f} "
                  f"(best {run.loop.best['auc']:.4f} at {run.loop.best['step']})")
    # Every rank computed the same metrics; all-reducing the decision anyway means no rank can wait for
    # a collective the others skipped (the reference decided on rank 0 alone and hung).
    return all_ranks_agree(run.loop.bad_evals >= cfg.patience, run.world, run.device)


def finish(run):
    """Chapter 4: reload the best weights, score the test split once, write metrics.json. -> the result."""
    cfg, ds = run.cfg, run.ds
    collm.restore_tensors(run.model, load_checkpoint(os.path.join(run.out, "best.pt"), BEST_KEYS))
    test_rows = np.arange(len(ds.splits["test"]))[:cfg.test_rows or None]
    enc_test = collm.encode(cfg, ds, run.tok, "test", run.model)
    test_scores = metrics.score_rows(run.model, enc_test, ds.splits["test"], test_rows, run.eval_batch_size, run.pad,
                                     run.device, run.dtype, run.rank, run.world)
    test = metrics.report(ds.splits["test"], test_scores, test_rows)
    digests = rank_digests(run.trainable, run.world)
    result = metrics.metrics_block({k: run.loop.best[k] for k in ("auc", "uauc", "uauc_users", "rows")}, test)
    result.update(stage=cfg.stage, llm=cfg.llm, rec=cfg.rec if cfg.stage == "cie" else None, dtype=run.dtype_name,
                  dtype_reason=run.dtype_reason, data_source=ds.source, random_weights=cfg.llm.startswith("random:"),
                  best_step=run.loop.best["step"], samples_seen=run.loop.step * run.samples_per_step,
                  samples_per_step=run.samples_per_step, seconds=round(time.time() - run.loop.t0, 1), rank_digests=digests,
                  config=asdict(cfg), command=command_line(cfg, run.world), history=run.loop.history,
                  loss_log=run.loop.loss_log)
    if run.master:
        metrics.write_metrics(os.path.join(run.out, "metrics.json"), result)
        if result["random_weights"]:
            print(f"warning: --llm {cfg.llm} has random weights: the AUCs below mean nothing (speed and memory only)")
        print(f"{cfg.stage} {cfg.llm}: best step {run.loop.best['step']}, {cfg.eval_split} AUC {run.loop.best['auc']:.4f}, "
              f"test AUC {test['all']['auc']:.4f} UAUC {test['all']['uauc']:.4f} (warm {test['warm']['auc']:.4f}, "
              f"cold {test['cold']['auc']:.4f}), {result['seconds']:.0f}s -> {os.path.join(run.out, 'best.pt')}")
    return result


def train(cfg):
    """One run: set up, step (evaluating, saving, stopping early), test. -> metrics.json's dict, or None if paused."""
    run = set_up(cfg)
    bar = tqdm(total=cfg.max_steps, initial=run.loop.step, desc=cfg.stage, disable=not run.master, dynamic_ncols=True)
    stop = halt = False
    signalled = catch_stop_signals()
    run.model.train()
    while run.loop.step < cfg.max_steps and not stop:
        lr = train_step(run, run.loop.window)
        bar.update(1)
        log_step(run, bar, lr, run.loop.window)
        at_eval = run.loop.step % cfg.eval_every == 0 or run.loop.step == cfg.max_steps
        if at_eval:
            stop = evaluate_and_save(run, bar)
        # Ctrl-C / SIGTERM: every rank stops after the same step (a rank that missed the signal too)
        halt = run.loop.step == cfg.pause_at or all_ranks_agree(signalled.is_set(), run.world, run.device)
        if (at_eval or halt) and run.master:
            save(run, "last.pt", with_state=True)  # what --resume continues from
        if halt:  # pausing or stopping: only ever here, after last.pt is saved
            break
        run.model.train()  # scoring switched dropout off
    bar.close()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here a signal stops at once
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    paused = halt and run.loop.step < cfg.max_steps and not stop
    if paused and run.master:  # with as many processes as now: last.pt refuses another count
        again = f"torchrun --nproc-per-node {run.world} train.py" if run.world > 1 else "python train.py"
        why = f"stopped by {signalled.name}" if signalled.is_set() else "paused"
        print(f"{why} at step {run.loop.step} (last.pt saved); continue with: {again} --resume {run.out}")
    result = None if paused else finish(run)
    if run.world > 1:
        dist.barrier()  # rank 0 may still be writing metrics.json: no rank tears down while another works
        dist.destroy_process_group()
    if run.lock is not None:
        run.lock.close()  # the folder is free again (a process that dies frees it as well)
    return result


def catch_stop_signals():
    """Ctrl-C / SIGTERM: end the step, save last.pt, say how to resume. -> an Event; a second signal stops."""
    event = threading.Event()

    def handler(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt
        event.name = signal.Signals(signum).name
        event.set()
        print(f"\n{event.name}: saving last.pt after this step (again to stop at once)", file=sys.stderr, flush=True)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)
    return event


def calibrate(model, enc, split, batch_size, pad, device, dtype, seed, n=256):
    """--calibrate: shift every score so that n random train rows (the same on every rank) average the logit
    of train's positive rate; else a small LLM's first steps only move all scores (docs/RESULTS.md)."""
    rows = np.sort(np.random.default_rng(seed).choice(len(split), min(n, len(split)), replace=False))
    scores = metrics.score_rows(model, enc, split, rows, batch_size, pad, device, dtype, what="calibrating: scoring")
    rate = float(split.label.mean())
    shift = math.log(rate / (1 - rate)) - float(scores.mean())
    model.score_bias.add_(shift)
    return shift


def rank_digests(trainable, world):
    """A hash of the trained weights from every rank: DDP keeps them bit-identical, else a warning."""
    mine = tensor_digest(trainable.values())
    digests = [None] * world if world > 1 else [mine]
    if world > 1:
        dist.all_gather_object(digests, mine)
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
    try:
        train(parse_config(argv))
    except KeyboardInterrupt:  # before the first step (loading, calibration) or a second Ctrl-C
        raise UsageError("interrupted; the run folder keeps the last.pt it last saved, if any (--resume DIR)")


if __name__ == "__main__":
    data.cli_main(main)
