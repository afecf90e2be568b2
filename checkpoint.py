"""checkpoint.py: what a training run keeps, and the model it describes. A checkpoint holds the run's
settings and its small trained tensors (LoRA, projector, collaborative model), never the LLM; this
chapter reads one back and checks it, builds the CoLLM that a stage's settings describe (with a
checkpoint's tensors, or fresh: build_model, which train.py calls for every run), and scores, exports
or ranks with a saved run:

    python train.py --evaluate --ckpt runs/cie/best.pt --split test      # AUC / UAUC, warm and cold
    python train.py --evaluate --ckpt runs/lora/best.pt --export out/    # for transformers + peft
    python train.py --evaluate --ckpt checkpoints/tallrec-smollm2 --user 1 --top 10   # rank one user's items

Rebuilding the model from a checkpoint is the loop's knowledge (which LLM, which stage, which tensors),
so it lives after collm.py and eval.py stays the metrics chapter; the reference evaluates the same
way, by rerunning its training script with `evaluate: True`. train.py hands --evaluate its settings
(train.Config) and the command line that made them.
"""
import argparse
import json
import os
import sys
from dataclasses import asdict

import numpy as np
import torch

import backbone
import collab
import collm
import data
import eval as metrics  # our eval.py, by what it holds (a plain `import eval` would hide the builtin)
from prepare import UsageError

# ---------------------------------------------------------------------------------------------
# Checkpoints: only the small tensors + settings + loop state (train.save writes them atomically)


# What each use of a checkpoint needs: scoring (best.pt, or last.pt) the tensors and the settings
# that rebuild the model; --resume also the optimizer and loop state that only last.pt holds.
BEST_KEYS = ("config", "lora", "step")
LAST_KEYS = BEST_KEYS + ("optimizer", "scaler", "best", "bad_evals", "history")


def load_checkpoint(path, need=()):
    """A train.py checkpoint, checked before use: every fault is one line naming the file and what is
    wrong with it (missing, empty, truncated, damaged, not ours, or without the keys `need` lists)."""
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
    # numbers, silently. So every checkpoint carries a digest of its tensors (save), checked here;
    # files written before it did have none and load as they always did.
    if "digest" in state and state["digest"] != tensor_digest(tensors_in({**state, "digest": None})):
        raise UsageError(f"{path}: damaged: its tensors do not match the digest saved with them (bytes changed "
                         f"on disk or in a copy); use another copy of the run")
    missing = [k for k in need if k not in state]
    if "optimizer" in missing and "lora" in state:
        raise UsageError(f"{path}: weights only, no optimizer state (a best.pt?); --resume continues from the "
                         f"last.pt that train.py saves at every evaluation")
    if missing:
        raise UsageError(f"{path}: no {', '.join(missing)} in it; not a train.py checkpoint (best.pt or last.pt)")
    return state


def unreadable(path):
    """Why torch could not read a file, in words: a checkpoint is a zip (torch.save's format), so a
    zip's signature without the directory at its end means the file was cut short."""
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
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def tensor_digest(tensors):
    """A SHA-1 of tensors' dtypes, shapes and raw bytes: equal iff the tensors are bit for bit equal.
    Checkpoints carry one (checked on load) and metrics.json one per rank (rank_digests)."""
    import hashlib
    h = hashlib.sha1()
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
    return h.hexdigest()


def load_stage1(path):
    """Stage 2's --ckpt: a stage-1 checkpoint file (best.pt), or an --export folder of one, such as the
    shipped checkpoints/ folders, which hold the same tensors as safetensors."""
    if not os.path.isdir(path):
        return load_checkpoint(path)
    state = metrics.load_export(path)
    # load_export points "llm" at the folder's base/ copy when it has one; stage 2 checks the LLM by
    # the name the run trained with (its --llm), which the export records
    with open(os.path.join(path, metrics.EXPORT_JSON)) as f:
        state["config"]["llm"] = json.load(f)["llm"]
    return state


def model_tensors(model):
    """What a checkpoint keeps of the model: LoRA, the projector and the collaborative model."""
    from peft import get_peft_model_state_dict
    out = {"lora": get_peft_model_state_dict(model.llm), "score_bias": float(model.score_bias)}
    if model.rec is not None:
        out["proj"] = model.proj.state_dict()
        out["rec"] = collab.rec_checkpoint(model.rec)
    return out


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


# ---------------------------------------------------------------------------------------------
# Building the model for a stage (--resume and --evaluate call this too, with a checkpoint's tensors)


def build_model(cfg, data_set, dtype, state=None):
    """-> (CoLLM, tokenizer). `state` = a checkpoint of this script whose tensors are loaded
    (resume, evaluation); without it, stage 2 takes LoRA from --ckpt and the rec model from --rec-ckpt."""
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
    llm, tok = backbone.load_llm(cfg.llm, cfg.cache_dir, dtype or torch.float32)
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
    if cfg.stage == "cie":
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
    # Exactly the tensors this stage trains: LoRA in stage 1; the projector in stage 2, plus the
    # collaborative model with --tune-rec and LoRA with --tune-lora.
    for name, p in model.named_parameters():
        p.requires_grad_(("lora_" in name) if cfg.stage == "lora" else
                         name.startswith("proj.") or (cfg.tune_rec and name.startswith("rec."))
                         or (cfg.tune_lora and "lora_" in name))
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
# --evaluate: score a saved run. Rebuilding the model from a checkpoint is this file's knowledge
# (which LLM, which stage, which tensors), so it lives here and eval.py stays the metrics chapter;
# the reference evaluates the same way, by rerunning its training script with `evaluate: True`.


def parse_evaluate(argv=None):
    p = argparse.ArgumentParser(prog="train.py --evaluate",
                                description="Score a train.py checkpoint on every row of a split: AUC and UAUC "
                                            "overall, on warm rows and on cold rows. Or use the trained model: "
                                            "--export it for transformers + peft, or rank one --user's items.")
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint (best.pt or last.pt), or an --export folder")
    p.add_argument("--split", default="test", choices=("test", "valid", "valid_small"), help="split to score (default test)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per scoring batch (default 16)")
    p.add_argument("--rows", type=int, default=0, help="score only the first N rows (0 = all)")
    p.add_argument("--data-root", default=None, help="folder holding datasets (default: the checkpoint's setting)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run (default auto)")
    p.add_argument("--dtype", default=None, choices=("auto", "bf16", "fp16", "fp32"),
                   help="compute dtype (default: the run's own --dtype; its default, auto, picks what THIS "
                        "machine computes natively, e.g. fp32 on a CPU without bf16 units)")
    p.add_argument("--out", default=None, help="write metrics.json here instead of beside the checkpoint")
    p.add_argument("--export", metavar="DIR", help="instead of scoring: write the model to DIR (a new or empty "
                   "folder): the LoRA in peft's format (adapter_config.json, adapter_model.safetensors), and for "
                   "stage 2 the projector and collaborative model as safetensors; collm_export.json says what is what")
    p.add_argument("--with-base", action="store_true", help="--export: save the base LLM and tokenizer in DIR/base "
                   "too (always done for --llm tiny, which is built in code)")
    p.add_argument("--export-dtype", default="fp32", choices=("fp32", "fp16"), help="--export: store the trained "
                   "tensors in this dtype (default fp32, as trained; fp16 halves the files, and loading casts them "
                   "back to fp32: the shipped checkpoints/ are fp16)")
    p.add_argument("--user", help="instead of scoring: rank candidate items for this user id, or for each of "
                   "several (1,2,3: the model is built once)")
    p.add_argument("--candidates", default="test", choices=("test", "unseen"),
                   help="--user: test = the user's test rows, each with the history it had (without test rows, --top "
                        "items the user never rated); unseen = every item of the data the user has no rating of, with "
                        "the user's current history: what to recommend next (default test)")
    p.add_argument("--items", help="--user: comma-separated item ids to rank instead, with the user's current history")
    p.add_argument("--top", type=int, default=0, help="--user: print only the best K (0 = all; 10 items are drawn "
                   "when the user has no test rows)")
    p.add_argument("--json", action="store_true", help="--user: print each user's ranking as one JSON object a line "
                   "(user, candidates scored, items: item, title, score, probability = sigmoid(score), label)")
    p.add_argument("--show-prompt", action="store_true", help="--user: print the first candidate's prompt")
    p.add_argument("--no-compile", action="store_true", help="score eagerly even if the run trained with --compile "
                   "(compiling takes about a minute: worth it for a whole split, not for a slice)")
    args = p.parse_args(argv)
    problems = []  # every bad flag at once
    if args.batch_size < 1:  # -1 scored no row at all, and wrote AUC 0.5 with exit 0
        problems.append(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.rows < 0:  # rows[:-N] would be Python's "all but the last N"
        problems.append(f"--rows must be >= 0 (got {args.rows})")
    if args.export and args.user is not None:
        problems.append("--export and --user: one at a time")
    if args.top < 0:
        problems.append(f"--top must be >= 0 (got {args.top})")
    if args.user is None and (args.items or args.top or args.show_prompt or args.json or args.candidates != "test"):
        problems.append("--items, --candidates, --top, --json and --show-prompt go with --user")
    if args.items is not None and args.candidates == "unseen":
        problems.append("--items and --candidates unseen: one at a time (the given items, or every unseen one)")
    if (args.with_base or args.export_dtype != "fp32") and not args.export:
        problems.append("--with-base and --export-dtype go with --export")
    if problems:
        raise UsageError("; ".join(problems))
    if args.user is not None:
        args.user = list(dict.fromkeys(metrics.parse_ids(args.user, "--user")))  # each user once
    if args.items is not None:  # given, even as ',' (no ids): refused, never read as "not given"
        args.items = metrics.parse_ids(args.items, "--items")
    return args


def load_for_evaluation(args):
    """--ckpt (a checkpoint or an export folder) -> (its state, the run's settings with this command's
    device, dtype and data root: what train.py turns into its Config)."""
    if args.export:
        metrics.check_export_folder(args.export)  # before anything slow
    if not os.path.exists(args.ckpt):
        raise UsageError(f"--ckpt {args.ckpt}: file not found")
    state = metrics.load_export(args.ckpt) if os.path.isdir(args.ckpt) else load_checkpoint(args.ckpt)
    if "lora" not in state or "config" not in state:
        raise UsageError(f"--ckpt {args.ckpt}: not a train.py checkpoint (a collab.py model.pt? those are "
                         f"evaluated by collab.py itself)")
    saved = state["config"]
    return state, {**saved, "device": args.device, "dtype": args.dtype or saved["dtype"],
                   "data_root": args.data_root or saved["data_root"]}


def evaluate(args, state, cfg, command):
    """Rebuild the run's model from --ckpt's `state` and settings `cfg` (a train.Config), then export
    it, rank one user's items, or score a split. `command`: the line that trained it (metrics.json)."""
    _, _, device = backbone.setup_distributed(cfg)
    dtype, dtype_name, dtype_reason = backbone.compute_dtype(cfg.dtype, device)
    # --json keeps stdout for the JSON alone
    print(f"=> scoring on {device} in {dtype_name} ({dtype_reason})", file=sys.stderr if args.json else sys.stdout)
    ds = data.load_dataset(cfg.data, cfg.data_root)
    if args.user is not None:  # unknown ids are reported before the model is built
        candidates = [metrics.candidates(ds, u, args.items, args.top or 10, unseen=args.candidates == "unseen")
                      for u in args.user]
    model, tok = build_model(cfg, ds, dtype, state)
    model.to(device)
    what = f"({cfg.stage}, {cfg.llm}, step {state['step']})"
    if args.export:
        template = data.load_template(ds.domain, "text" if cfg.stage == "lora" else "collm", cfg.template)
        metrics.export_model(model, tok, state, template, args.export, args.with_base, backbone.llm_source(cfg.llm),
                             backbone.DTYPES[args.export_dtype])
        print(f"exported {args.ckpt} {what} -> {args.export}")
        return
    if cfg.compile and not args.no_compile:  # scored as the run was trained (train.py --compile)
        backbone.compile_decoder(model)
    if args.user is not None:
        for user, of_user in zip(args.user, candidates):
            rank_user(args, cfg, ds, model, tok, user, of_user, device, dtype, what)
        return
    split = ds.splits[args.split]
    rows = np.arange(len(split))[:args.rows or None]
    metrics.check_both_classes(split, rows, f"--split {args.split} --rows {args.rows}")
    scores = metrics.score_rows(model, encode(cfg, ds, tok, args.split, model), split, rows, args.batch_size,
                                data.SegmentTokenizer(tok).pad_id, device, dtype)
    rep = metrics.report(split, scores, rows)
    metrics.print_table(f"{args.ckpt} on {cfg.data} {args.split} {what}", rep)
    # into the run's metrics.json (or --out's), beside what training wrote: the keys of this split only
    if os.path.isdir(args.ckpt) and not args.out:  # an export folder is kept as exported (checkpoints/)
        print("(metrics.json not written: --ckpt is an export folder; --out DIR writes it there)")
        return
    out = args.out or os.path.dirname(os.path.abspath(args.ckpt))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "metrics.json")
    result = metrics.read_metrics(path, "--out")[1] if os.path.exists(path) else {}
    result.update({**metrics.split_block(rep, args.split), "stage": cfg.stage, "llm": cfg.llm,
                   f"{args.split}_dtype": dtype_name})
    # a folder of its own (--out, or a checkpoint copied elsewhere) also gets what `eval.py --table`
    # reads: the run's settings, the command that trained these weights, and how many samples they
    # were trained on (checkpoints written before train.py saved that number leave it out: "-")
    result.setdefault("config", asdict(cfg))
    result.setdefault("command", command)
    if "samples_seen" in state:
        result.setdefault("samples_seen", state["samples_seen"])
    if state.get("best") and "auc" in state["best"]:  # the valid score training chose these weights by
        result.setdefault("valid", {k: state["best"][k] for k in ("auc", "uauc", "uauc_users", "rows")})
    metrics.write_metrics(path, result)
    print(f"-> {path}")


def rank_user(args, cfg, ds, model, tok, user, candidates, device, dtype, what):
    """--user: score one user's candidate rows and print them best first, as a table or as JSON."""
    import dataclasses
    import json
    split, labels, note = candidates
    # the candidates as one more split, so that prompts, batches and scores take the usual path
    ds = dataclasses.replace(ds, splits={**ds.splits, "rank": split})
    enc = encode(cfg, ds, tok, "rank", model)
    # candidates with the user's current history all share the prompt up to the target title: that
    # prefix runs once (test rows, each with its own history, are scored as evaluation scores them)
    scores = metrics.score_catalog(model, enc, split, args.batch_size, data.SegmentTokenizer(tok).pad_id, device, dtype)
    if args.json:
        print(json.dumps(metrics.rank_json(ds, split, scores, labels, args.top or None,
                                           user=user, data=cfg.data, ckpt=args.ckpt, candidates_are=note)))
        return
    print(f"user {user} of {cfg.data}: {note}\n{args.ckpt} {what}; "
          f"score = the 'Yes' logit, label = 1 liked / 0 not / - unknown")
    if args.show_prompt:
        template = data.load_template(ds.domain, "text" if cfg.stage == "lora" else "collm", cfg.template)
        segs = data.prompt_segments(template, [ds.titles[i] for i in split.history(0)], ds.titles[split.iid[0]])
        print(f"prompt of item {split.iid[0]}:\n{data.render_prompt(segs)}")
    print("\n".join(metrics.rank_table(ds, split, scores, labels, args.top or None)))
