"""eval.py: the metrics of the paper (AUC, UAUC, warm/cold subsets), scoring, and reading finished runs.

Chapter three. Both numbers the paper reports are ranking measures of a score, so any model that
gives one number per (user, item) row can be evaluated here, a collaborative model or an LLM:
  - AUC: the chance that a random positive row scores above a random negative row (ties count 1/2);
  - UAUC: the AUC inside each user's own rows, averaged over users that have both a positive and a
    negative row (a user with one row or one class has no AUC and is skipped, and counted).
Warm rows: user and item each have more than 3 train rows. Cold rows: not_cold == 0.

Besides the metrics: scoring a model on a split (score_rows), exporting and reloading a trained
model, ranking one user's items, and reading finished runs back. Everything here is handed a model
or plain data; rebuilding a model from a checkpoint belongs to checkpoint.py, a later chapter, so the
commands that start from a checkpoint are `python train.py --evaluate ...`:

    python eval.py --table runs/mf runs/lora runs/cie-mf            # the results table of finished runs
    python eval.py --plot runs/lora runs/cie-mf --out curves.png    # valid AUC and loss vs samples seen
    python eval.py --curves runs/cie-mf runs/cie-mf-tune-rec        # valid AUC at each scoring, as a table
    python train.py --evaluate --ckpt runs/cie-mf/best.pt --split test          # AUC / UAUC of a checkpoint
    python train.py --evaluate --ckpt runs/cie-mf/best.pt --export out/cie-mf   # LoRA for peft, the rest as safetensors
    python train.py --evaluate --ckpt runs/cie-mf/best.pt --user 17 --show-prompt   # rank one user's items
    python train.py --evaluate --ckpt runs/cie-mf/best.pt --user 17 --candidates unseen --top 10 --json  # recommend
"""
import numpy as np
from tqdm import tqdm

import data
import prepare
from prepare import UsageError, cli_main


# ---------------------------------------------------------------------------------------------
# Metrics as plain functions


def auc(labels, scores):
    """Rank-based AUC (the Mann-Whitney U statistic), ties counting one half; nan for one class."""
    labels = np.asarray(labels) > 0.5
    scores = np.asarray(scores, np.float64)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # average rank of each score (1-based); tied scores share the mean of their ranks
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)                  # rank of the last member of each tie group
    avg_rank = (ends - (counts - 1) / 2.0)[inverse]
    return float((avg_rank[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def uauc(users, labels, scores):
    """-> (mean per-user AUC over users with both classes, number of such users)."""
    users, labels, scores = np.asarray(users), np.asarray(labels), np.asarray(scores)
    order = np.argsort(users, kind="stable")
    cuts = np.flatnonzero(np.diff(users[order])) + 1
    per_user = [auc(labels[g], scores[g]) for g in np.split(order, cuts)]
    per_user = [value for value in per_user if not np.isnan(value)]
    return (float(np.mean(per_user)) if per_user else float("nan")), len(per_user)


def subsets(split, rows=None):
    """The row masks the paper reports: all rows, warm rows, cold rows (of `rows`, default all)."""
    rows = np.arange(len(split)) if rows is None else rows
    return {"all": np.ones(len(rows), bool), "warm": split.warm[rows], "cold": ~split.not_cold[rows]}


def report(split, scores, rows=None):
    """{"all"|"warm"|"cold": {"auc", "uauc", "uauc_users", "rows"}}; scores[k] belongs to row rows[k]."""
    rows = np.arange(len(split)) if rows is None else rows
    uid, label = split.uid[rows], split.label[rows]
    out = {}
    for name, m in subsets(split, rows).items():
        u, n = uauc(uid[m], label[m], scores[m])
        out[name] = {"auc": auc(label[m], scores[m]), "uauc": u, "uauc_users": n, "rows": int(m.sum())}
    return out


def check_both_classes(split, rows, what):
    """AUC ranks liked rows against the others, so rows of one class have none (nan): the run would
    train for nothing, never write best.pt and fail at its end. Said before training instead."""
    labels = np.unique(split.label[rows])
    if len(labels) < 2:
        held = f"all labelled {int(labels[0])}" if len(labels) else "none at all"
        raise UsageError(f"{what}: {len(rows)} rows, {held}; AUC needs liked and not-liked rows: score more rows "
                         f"(0 = all)")

# ---------------------------------------------------------------------------------------------
# metrics.json: every run folder holds one, written by collab.py, train.py and train.py --evaluate,
# in one layout: {"valid": {...}, "test": {...}, "test_warm": {...}, "test_cold": {...}, ...}, each
# block {"auc", "uauc", "uauc_users", "rows"}; a scored split S adds S, S_warm and S_cold.


def split_block(rep, split):
    """report() of one split -> its metrics.json keys: {split, split_warm, split_cold}."""
    return {split: rep["all"], f"{split}_warm": rep["warm"], f"{split}_cold": rep["cold"]}


def metrics_block(valid, test_report):
    """The metrics every finished run writes: the model-selection block (the "all" block of the
    valid split, at the chosen epoch or step) and the test split in full, warm and cold."""
    return {"valid": valid, **split_block(test_report, "test")}


def write_metrics(path, result):
    """metrics.json (or any JSON result), written atomically: a reader never sees half of it."""
    import json

    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    prepare.write_atomic(path, dump)


# ---------------------------------------------------------------------------------------------
# Scoring a model: every row exactly once, sharded over processes, no gradients


def score_rows(model, enc, split, rows, batch_size, pad_id, device, dtype=None, rank=0, world=1):
    """-> (len(rows),) float64 scores of `model` (a CoLLM, unwrapped from DDP) for `rows` of a split.

    The rows are cut into batches that keep one user's rows with the same history together (the
    model then computes their shared prompt prefix once), longest first; rank r scores batches
    r, r + world, ... (no DistributedSampler: it pads shards by repeating rows, which would count
    some rows twice), and every rank gathers every score. Scores come back in row order."""
    import torch
    rows = np.asarray(rows)
    groups = data.prefix_groups(enc, rows) if getattr(model, "prefix_cache", False) else None
    mine = data.eval_batches(enc.lengths[rows], batch_size, enc.shared[rows], groups)[rank::world]
    scores = np.full(len(rows), np.nan)
    was_training = model.training
    model.eval()  # dropout off
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)
    with torch.no_grad(), amp:
        # a bar on rank 0 only; leave=False: it disappears when done, the caller prints the result
        for b in tqdm(mine, desc=f"scoring {len(rows):,} rows", disable=rank != 0, leave=False):
            batch = data.collate(enc, split, rows[b], pad_id, model.his_len)  # + history ids for SASRec / DIN
            scores[b] = model(**{k: v.to(device) for k, v in batch.items()}).float().cpu().numpy()
    model.train(was_training)
    if world > 1:
        import torch.distributed as dist
        done = np.concatenate(mine) if mine else np.zeros(0, np.int64)
        shards = [None] * world
        dist.all_gather_object(shards, (done, scores[done]))
        for done, values in shards:
            scores[done] = values
    return scores


def score_catalog(model, enc, split, batch_size, pad_id, device, dtype=None, rows=None):
    """-> (len(rows),) float64 scores of `rows` (default: every row), equal to score_rows's, for rows
    that mostly begin with the same prompt up to the target title: one user's candidates with one
    history (train.py --evaluate --user U --candidates unseen). Each distinct prefix (data.prefix_groups)
    runs once for all its rows (collm.CoLLM.run_prefix), and each batch runs only its rows' own tokens,
    the title and the end of the question. A title whose first characters merge with the quote before
    it (a BPE token such as ' "(') changes a token before the title: such rows form prefix groups of
    their own, scored exactly all the same. A model that cannot run a prefix apart goes to score_rows."""
    import torch
    rows = np.arange(len(split)) if rows is None else np.asarray(rows)
    if not model.shares_prefixes():
        return score_rows(model, enc, split, rows, batch_size, pad_id, device, dtype)
    groups = data.prefix_groups(enc, rows)
    scores = np.full(len(rows), np.nan)
    was_training = model.training
    model.eval()
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)
    with torch.no_grad(), amp, tqdm(total=len(rows), desc=f"scoring {len(rows):,} candidates", leave=False) as bar:
        for g in np.unique(groups):
            mine = np.flatnonzero(groups == g)
            scores[mine] = score_one_prefix(model, enc, split, rows[mine], batch_size, pad_id, device, bar)
    model.train(was_training)
    return scores


def score_one_prefix(model, enc, split, rows, batch_size, pad_id, device, bar):
    """score_catalog's scores of `rows`, which all share their first enc.shared tokens: those run once."""
    import torch
    to_device = lambda batch: {k: v.to(device) for k, v in batch.items()}
    first = to_device(data.collate(enc, split, rows[:1], pad_id, model.his_len))
    # every row's collaborative ids (stage 2): run_prefix checks whether the user slot differs among them
    ids = dict(uid=torch.from_numpy(split.uid[rows]).to(device), iid=torch.from_numpy(split.iid[rows]).to(device),
               his=torch.from_numpy(data.padded_history(split, model.his_len, rows)).to(device) if model.his_len else None)
    prefix = model.run_prefix(first, int(enc.shared[rows[0]]), **ids)
    scores = np.full(len(rows), np.nan)
    for b in data.eval_batches(enc.lengths[rows], batch_size):
        batch = to_device(data.collate(enc, split, rows[b], pad_id, model.his_len))
        scores[b] = model(**batch, prefix=prefix).float().cpu().numpy()
        bar.update(len(b))
    return scores


# ---------------------------------------------------------------------------------------------
# Using a trained model outside the loop: export it in formats other tools read, reload an export,
# and rank one user's candidate items. Each is handed a model, or returns plain data: rebuilding a
# model from a checkpoint is the loop's knowledge (which LLM, which stage, which tensors), so
# `python train.py --evaluate --ckpt ...` rebuilds it and calls these (as the reference evaluates by
# rerunning its training script with `evaluate: True`). load_export returns a dict shaped like a
# checkpoint, which checkpoint.build_model rebuilds exactly as it rebuilds a checkpoint.

EXPORT_JSON = "collm_export.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what peft's save_pretrained writes
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
    import os
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise UsageError(f"--export {folder}: exists and is not an empty folder; give a new folder")


def describe(tensors, notes, owner):
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                "is": notes.get(k, f"a tensor of {owner}'s state_dict")} for k, v in tensors.items()}


def export_model(model, tok, state, template, folder, with_base=False, source="", dtype=None):
    """Write a rebuilt CoLLM (checkpoint.build_model) and its checkpoint `state` to `folder`, nothing pickled:

        adapter_config.json, adapter_model.safetensors   the LoRA, in peft's own format:
                                                          PeftModel.from_pretrained(base_llm, folder)
        base/                                            the base LLM + tokenizer (save_pretrained), when
                                                          with_base or when the LLM is built in code (tiny)
        projector.safetensors, rec.safetensors           stage 2: the projector and the collaborative
                                                          model's whole state_dict (any model of collab.py)
        collm_export.json                                what each file and tensor is, the prompt, its
                                                          tokenisation, the score

    `source`: where the base LLM comes from, in words (backbone.llm_source); `dtype`: what the trained
    tensors are stored in (None: as trained, float32; float16 halves the files, and loading casts them
    back into the model's float32 parameters). Written into a temporary
    sibling folder and renamed at the end (prepare.write_atomic): a crash leaves no half export."""
    import os
    check_export_folder(folder)
    cfg = state["config"]
    name = model.llm.get_base_model().config._name_or_path  # a hub id, a folder of this machine, '' when built in code
    with_base = with_base or not name
    info = {
        "what": "a CoLLM checkpoint exported by train.py --evaluate --export (arXiv 2310.19488)",
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
        "lora": {"files": list(ADAPTER_FILES), "format": "peft LoRA adapter",
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
    prepare.write_atomic(os.path.abspath(folder), lambda tmp: write_export(model, tok, state, info, tmp, with_base, dtype))
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
    import json
    import os
    from safetensors.torch import load_file, save_file

    def stored(tensors):  # contiguous copies (safetensors refuses views and shared memory), floats in `dtype`
        return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
                .clone() for k, v in tensors.items()}
    seg = data.SegmentTokenizer(tok)
    os.makedirs(tmp)
    # peft names the base model in adapter_config.json and its README.md by the path it was loaded from
    # here (cache/smollm2-135m, relative to where train.py ran). Saved with the hub id or no name (a
    # name makes peft look the model up on the hub), then adapter_config.json names it as info does.
    hub_id = info["base_model"] if info["base_model"] != "base" else None
    model.llm.get_base_model().config._name_or_path = hub_id or ""
    for peft_config in model.llm.peft_config.values():
        peft_config.base_model_name_or_path = hub_id
    model.llm.save_pretrained(tmp)  # peft writes exactly the adapter tensors and their LoraConfig
    with open(os.path.join(tmp, ADAPTER_FILES[0])) as f:
        adapter = json.load(f)
    with open(os.path.join(tmp, ADAPTER_FILES[0]), "w") as f:
        json.dump({**adapter, "base_model_name_or_path": info["base_model"]}, f, indent=2)
    if dtype is not None:  # peft saved the adapters as trained: store them again in `dtype`
        path = os.path.join(tmp, ADAPTER_FILES[1])
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
    with open(os.path.join(tmp, EXPORT_JSON), "w") as f:
        json.dump(info, f, indent=1)
    # safetensors writes its files readable by their owner only; an export is made to be shared
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _, files in os.walk(tmp):
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)


def load_export(folder):
    """An export folder -> a dict shaped like a train.py checkpoint (config, step, lora, proj, rec),
    which checkpoint.build_model turns back into the same CoLLM. The LLM is the export's base/ when it
    has one, else the LLM the run was trained with. A missing or unreadable file is one error line
    naming it."""
    import json
    import os

    def read_json(path):
        with open(path) as f:
            return json.load(f)
    if not os.path.isfile(os.path.join(folder, EXPORT_JSON)):
        raise UsageError(f"{folder}: no {EXPORT_JSON} there (not a train.py --evaluate --export folder)")
    info, lora = export_file(folder, EXPORT_JSON, read_json), export_file(folder, ADAPTER_FILES[0], read_json)
    try:
        return export_state(folder, info, lora)
    except (KeyError, TypeError) as e:  # valid JSON, but not what an export writes
        raise UsageError(f"{folder}: {EXPORT_JSON} or {ADAPTER_FILES[0]} lacks {e} (not written by train.py "
                         f"--evaluate --export?)")


def export_state(folder, info, lora):
    """load_export's dict from the two parsed JSON files; the tensors are read from their files."""
    import os
    from safetensors.torch import load_file
    config = dict(info["config"])
    # the adapters are rebuilt with the shape peft recorded, whatever the run's own flags said
    config.update(lora_r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=lora["lora_dropout"],
                  lora_targets=",".join(sorted(lora["target_modules"])))
    if os.path.isdir(os.path.join(folder, "base")):
        config["llm"] = os.path.join(folder, "base")
    state = {"config": config, "step": info.get("step"), "lora": export_file(folder, ADAPTER_FILES[1], load_file),
             "score_bias": info.get("score_bias", 0.0)}
    for key, saved in (("samples_seen", "samples_seen"), ("best", "best_valid")):
        if info.get(saved) is not None:
            state[key] = info[saved]
    if "rec" in info:
        state["proj"] = export_file(folder, info["projector"]["file"], load_file)
        state["rec"] = {"model": info["rec"]["model"], "config": info["rec"]["config"],
                        "state_dict": export_file(folder, info["rec"]["file"], load_file)}
    return state


def export_file(folder, name, read):
    """read(path) of one file of an export folder; missing, cut short or not what it should be: one
    error line naming the file (a copy that lost a file, an interrupted download)."""
    import os
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise UsageError(f"{path}: not found; an export folder holds {', '.join(ADAPTER_FILES)} and {EXPORT_JSON} "
                         f"(train.py --evaluate --export); copy the whole folder")
    try:
        return read(path)
    except Exception as e:  # JSONDecodeError, safetensors' SafetensorError, UnicodeDecodeError: all "unreadable"
        raise UsageError(f"{path}: cannot be read, truncated or not this kind of file "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")


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


def rank_json(ds, split, scores, labels, top=None, **about):
    """The ranking as one JSON-ready dict: `about` (user, ...), how many candidates were scored, and
    the best `top` items with their title, score, probability (sigmoid(score): the model was trained
    with binary cross-entropy on the score) and label (null = the data has no rating of it)."""
    order = np.argsort(-scores, kind="stable")[:top]
    items = [{"item": int(split.iid[r]), "title": ds.titles[split.iid[r]], "score": float(scores[r]),
              "probability": float(0.5 + 0.5 * np.tanh(scores[r] / 2)),  # sigmoid, without overflow
              "label": None if np.isnan(labels[r]) else int(labels[r])} for r in order]
    return {**about, "candidates": len(split), "items": items}


# ---------------------------------------------------------------------------------------------
# Reading finished runs: the results table and the learning curves


def print_table(title, rep):
    print(title)
    print(f"{'rows':<6}{'AUC':>8}{'UAUC':>8}{'users':>7}{'rows':>7}")
    for name, m in rep.items():
        print(f"{name:<6}{m['auc']:>8.4f}{m['uauc']:>8.4f}{m['uauc_users']:>7}{m['rows']:>7}")


# The paper's ML-1M test numbers (its table of overall results; the LLM rows with Vicuna-7B), printed beside ours.
PAPER_ML1M = {"MF": (0.6482, 0.6361), "LightGCN": (0.5959, 0.6499), "SASRec": (0.7078, 0.6884),
              "DIN": (0.7166, 0.6459), "TALLRec": (0.7097, 0.6818), "CoLLM-MF": (0.7295, 0.6875),
              "CoLLM-LightGCN": (0.7100, 0.6967), "CoLLM-SASRec": (0.7235, 0.6990), "CoLLM-DIN": (0.7243, 0.6897)}
# pop (the popularity anchor) is not in the paper: its rows show "-" in the paper column
REC_NAMES = {"mf": "MF", "lightgcn": "LightGCN", "sasrec": "SASRec", "din": "DIN", "pop": "Pop"}


def variant(config):
    """How much of CoLLM stage 2 trained, in the words of the reference's switches: `frozen` (the
    projector alone), `tune-rec` (the collaborative model too, from its collab.py checkpoint),
    `tune-rec-scratch` (the same, from a fresh initialisation), each with `+tune-lora` when stage 1's
    LoRA trained on as well."""
    name = "frozen"
    if config.get("tune_rec"):
        name = "tune-rec" if config.get("rec_ckpt") else "tune-rec-scratch"
    return name + ("+tune-lora" if config.get("tune_lora") else "")


def llm_run_kind(m):
    """train.py's metrics.json -> (method, variant): stage 1 is TALLRec, stage 2 CoLLM-<its
    collaborative model> with the variant its switches name."""
    config = m["config"]
    if m["stage"] == "lora":
        return "TALLRec", "-"
    return f"CoLLM-{REC_NAMES[config['rec']]}", variant(config)


def result_row(run):
    """A run folder (train.py's or collab.py's) -> one results row: what the table prints and what
    --json keeps."""
    import os
    path, m = read_metrics(run, "--table")
    try:
        config = m["config"]
        if "stage" in m:  # train.py: stage 1 is TALLRec, stage 2 CoLLM with its collaborative model
            method, kind = llm_run_kind(m)
            llm, rec = m["llm"], (config["rec"] if m["stage"] == "cie" else None)
            stage1 = config.get("ckpt") if m["stage"] == "cie" else None
            # the variant names the switches; the budget and learning rate (the other axes of the
            # stage-2 study) stand beside it, so two rows of one variant are told apart without --command
            steps, lr = config["max_steps"], config["lr"]
        else:  # collab.py
            method, llm, rec, kind, stage1 = REC_NAMES[config["model"]], "-", config["model"], "-", None
            steps, lr = None, config.get("lr")
        t, w, c = m["test"], m["test_warm"], m["test_cold"]
        row = {"name": os.path.basename(os.path.dirname(os.path.abspath(path))), "method": method, "llm": llm,
               "rec": rec, "variant": kind, "max_steps": steps, "lr": lr, "seed": config.get("seed"), "stage1": stage1,
               "samples_seen": m.get("samples_seen"), "test_rows": t["rows"], "test_auc": t["auc"],
               "test_uauc": t["uauc"], "warm_auc": w["auc"], "cold_auc": c["auc"],
               "valid_auc": m.get("valid", {}).get("auc"), "command": m.get("command"), "data": config["data"]}
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--table {path}: not a finished train.py or collab.py metrics.json "
                         f"({type(e).__name__}: {e})")
    return row


def results_table(rows):
    """Result rows -> one Markdown table, with the paper's ML-1M numbers beside ours."""
    lines = ["| run | method | variant | llm | samples seen | test rows | test AUC | test UAUC | warm AUC | cold AUC "
             "| paper AUC / UAUC |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        paper = PAPER_ML1M.get(r["method"]) if r["data"] == "ml-1m" else None
        seen = "-" if r["samples_seen"] is None else f"{r['samples_seen']:,}"
        lines.append(f"| {r['name']} | {r['method']} | {r['variant']} | {r['llm']} | {seen} | {r['test_rows']:,} | "
                     f"{r['test_auc']:.4f} | {r['test_uauc']:.4f} | {r['warm_auc']:.4f} | {r['cold_auc']:.4f} | "
                     f"{f'{paper[0]:.4f} / {paper[1]:.4f}' if paper else '-'} |")
    return "\n".join(lines)


def write_results_json(rows, path):
    """--json FILE: the rows as a JSON list; `shipped` says whether a folder of the run's name stands
    beside FILE (checkpoints/results.json lists every run, and ships some as export folders).
    An existing FILE is updated, not replaced: a row of the same name is swapped in place and the rows
    of other runs stay, since run folders live on one machine and results.json outlives them (a
    later sitting adds its runs without the earlier ones' folders)."""
    import json
    import os
    here = os.path.dirname(os.path.abspath(path))
    old = []
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except ValueError:  # not JSON (or cut short)
            old = None
        if not (isinstance(old, list) and all(isinstance(r, dict) and "name" in r for r in old)):
            raise UsageError(f"--json {path}: not a results list written by eval.py --table --json (move it "
                             f"aside to start a new one)")
    new = {r["name"]: r for r in rows}
    rows = [new.pop(r["name"], r) for r in old] + list(new.values())
    rows = [{**r, "shipped": os.path.isdir(os.path.join(here, r["name"]))} for r in rows]

    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
    prepare.write_atomic(path, dump)
    return rows


def read_metrics(run, flag):
    """A run folder (or its metrics.json) -> (path, the parsed file); a missing or unreadable one is
    one `error:` line naming it."""
    import json
    import os
    path = os.path.join(run, "metrics.json") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {run}: no metrics.json there (a train.py or collab.py --out folder)")
    try:
        with open(path) as f:
            return path, json.load(f)
    except ValueError as e:
        raise UsageError(f"{flag} {path}: not a finished train.py or collab.py metrics.json "
                         f"({type(e).__name__}: {e})")


def learning_curve(m, path):
    """train.py's metrics.json -> (samples seen at each evaluation, valid AUC there, samples seen at
    each logged step, training loss there). Samples, not steps: runs with other batch sizes or
    process counts share one axis. Runs older than the per-step record of `samples_per_step`
    derive it from the total (samples_seen over the last evaluated step)."""
    history = m.get("history")
    if not history:
        raise UsageError(f"--plot {path}: no learning curve (history) in it: only train.py runs have one")
    per_step = m.get("samples_per_step") or m["samples_seen"] / history[-1]["step"]
    losses = m.get("loss_log", [])
    return ([h["step"] * per_step for h in history], [h["auc"] for h in history],
            [x["step"] * per_step for x in losses], [x["loss"] for x in losses])


def curves_table(run_dirs):
    """--curves: the valid AUC of train.py runs at each of their scorings, one Markdown row per run,
    the best in bold (the checkpoint best.pt keeps): how the settings of a study are compared, on
    valid and never on test."""
    import os
    lines = ["| run | method | variant | seed | valid rows | steps | valid AUC at each scoring | best | wall s |",
             "|---|---|---|---:|---:|---|---|---|---:|"]
    for run in run_dirs:
        path, m = read_metrics(run, "--curves")
        history, config = m.get("history"), m.get("config", {})
        if not history or "stage" not in m or "config" not in m:
            raise UsageError(f"--curves {path}: no valid history (history) in it: only train.py runs have one")
        method, kind = llm_run_kind(m)
        best = max(history, key=lambda h: h["auc"])
        aucs = " / ".join(f"**{h['auc']:.4f}**" if h is best else f"{h['auc']:.4f}" for h in history)
        rows = f"{history[0]['rows']:,}" if "rows" in history[0] else "-"  # older runs did not record it
        wall = f"{m['seconds']:,.0f}" if "seconds" in m else "-"  # every sitting's wall time, scoring included
        lines.append(f"| {os.path.basename(os.path.dirname(os.path.abspath(path)))} | {method} | {kind} | "
                     f"{config.get('seed')} | {rows} | {' / '.join(str(h['step']) for h in history)} | {aucs} | "
                     f"{best['auc']:.4f} at {best['step']} | {wall} |")
    return "\n".join(lines)


def plot_runs(run_dirs, out):
    """Valid AUC (top) and training loss (bottom) against samples seen, one line per run, to `out`
    (any format matplotlib writes: .png, .pdf, .svg). matplotlib is optional: without it, one clear
    error line."""
    import os
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window: works on a machine without a screen
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is optional: pip install matplotlib")
    curves = []
    for run in run_dirs:
        path, m = read_metrics(run, "--plot")
        curves.append((os.path.basename(os.path.dirname(os.path.abspath(path))), m.get("config", {}).get("eval_split",
                       "valid"), *learning_curve(m, path)))
    # The loss panel only where some run logged losses (metrics.json of runs older than loss_log have none)
    with_loss = any(len(loss_values) for *_, loss_values in curves)
    fig, axes = plt.subplots(2 if with_loss else 1, 1, figsize=(7, 7 if with_loss else 4), sharex=True, squeeze=False)
    top, bottom = axes[0, 0], axes[-1, 0]
    for name, split, x_auc, auc_values, x_loss, loss_values in curves:
        top.plot(x_auc, auc_values, marker="o", label=f"{name} ({split})")
        if with_loss:
            bottom.plot(x_loss, loss_values, label=name)
    top.set_ylabel("valid AUC")
    top.axhline(0.5, color="grey", linewidth=0.5)  # chance: where an untrained ranking sits
    top.legend()
    if with_loss:
        bottom.set_ylabel("training loss (mean over a log window)")
    bottom.set_xlabel("samples seen")
    fig.tight_layout()
    prepare.write_atomic(out, lambda tmp: fig.savefig(tmp, format=os.path.splitext(out)[1][1:] or "png"))
    plt.close(fig)
    return out


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Tabulate finished runs (--table), their valid AUC at each scoring "
                                            "(--curves) or draw their learning curves (--plot). Scoring a checkpoint "
                                            "needs the model rebuilt, which is the training loop's knowledge: "
                                            "python train.py --evaluate --ckpt ...")
    p.add_argument("--table", nargs="+", metavar="RUN_DIR",
                   help="print a Markdown results table of these train.py / collab.py output folders (their "
                        "metrics.json), with the paper's ML-1M numbers beside them")
    p.add_argument("--plot", nargs="+", metavar="RUN_DIR",
                   help="draw valid AUC and training loss against samples seen for these train.py output "
                        "folders into --out (needs matplotlib)")
    p.add_argument("--curves", nargs="+", metavar="RUN_DIR",
                   help="print a Markdown table of these train.py output folders' valid AUC at each scoring "
                        "(their metrics.json history), the best in bold: a study's runs side by side")
    p.add_argument("--json", metavar="FILE", help="--table: also write its rows, with each run's command, "
                   "variant, budget, lr, seed and valid AUC, to FILE as a JSON list (checkpoints/results.json); "
                   "an existing FILE keeps its other runs' rows and gets these runs' rows in place of older ones")
    p.add_argument("--out", help="--plot: the picture to write (.png, .pdf, .svg)")
    args = p.parse_args(argv)
    if sum(map(bool, (args.table, args.plot, args.curves))) != 1:
        raise UsageError("give --table RUN_DIR ..., --curves RUN_DIR ... or --plot RUN_DIR ... --out FILE.png (one "
                         "of them); to score a checkpoint: python train.py --evaluate --ckpt CHECKPOINT")
    if args.table:
        rows = [result_row(run) for run in args.table]
        print(results_table(rows))
        if args.json:
            write_results_json(rows, args.json)
            print(f"-> {args.json}")
        return
    if args.json:
        raise UsageError("--json goes with --table")
    if args.curves:
        print(curves_table(args.curves))
        return
    if not args.out:
        raise UsageError("--plot needs --out FILE.png")
    print(f"-> {plot_runs(args.plot, args.out)}")


if __name__ == "__main__":
    cli_main(main)
