"""data.py: datasets, splits, prompts and batches for CoLLM (paper sections 3.1 and 4.1).

Chapter one of the toolkit. It turns the authors' released ML-1M split (or raw MovieLens files)
into plain numpy arrays, builds the Yes/No prompts of the paper, tokenises them once, and cuts
them into padded batches. Nothing here imports torch models or the LLM: every other file builds
on this one.

    python data.py --data ml-1m --stats                           # split sizes, positive rates, cold shares
    python data.py --data ml-1m --split test --show 5 --prompt collm   # row 5's prompt text

Where data comes from (`--data NAME_OR_DIR`, root = `--data-root`, else $COLLM_DATA, else ./data):
  1. `<root>/<name>/{train,valid,test,valid_small}_ood2.pkl`: the authors' pickles;
  2. `<root>/<name>.zip` holding those pickles (the released ml-1m.zip), read in place, never unpacked,
     so a read-only data folder works;
  3. for ml-1m only: raw GroupLens `ratings.dat` + `movies.dat` in `<root>/ml-1m/`, turned into the
     same four pickles by `build_ml1m_split` (the authors' rules, SPEC section 2), downloading the
     GroupLens zip first when the raw files are missing and the network allows.
"""
import argparse
import io
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

SPLITS = ("train", "valid", "test", "valid_small")
COLUMNS = ("uid", "iid", "label", "his", "his_title", "title", "not_cold")
PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"


class UsageError(Exception):
    """Bad input from the user (a file, a row, a flag). Every CLI prints it as one `error:` line and
    exits 2; it is the only exception type this toolkit defines."""


def cli_main(main):
    """Run a CLI `main()` so that a UsageError becomes `error: ...` on stderr and exit status 2."""
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def data_root(flag=None):
    """--data-root, else $COLLM_DATA, else ./data (the rule every CLI shares)."""
    return flag or os.environ.get("COLLM_DATA") or "data"


# ---------------------------------------------------------------------------------------------
# In-memory form: one Split per file, numpy arrays only (pandas stays in the loader)


@dataclass
class Split:
    """One split, one row per (user, item, label) interaction.

    Histories are ragged, so they are stored flat: row r's liked items, oldest first, are
    `his_items[his_ptr[r]:his_ptr[r+1]]` (the pickles' leading 0 sentinel is dropped)."""
    uid: np.ndarray       # (N,) int64, 1-based user id
    iid: np.ndarray       # (N,) int64, 1-based item id
    label: np.ndarray     # (N,) float32, 1 = rating >= 4
    not_cold: np.ndarray  # (N,) bool, user and item both appear in train
    his_ptr: np.ndarray   # (N+1,) int64 offsets into his_items
    his_items: np.ndarray  # (sum of history lengths,) int64
    warm: np.ndarray = None  # (N,) bool, filled by load_dataset once train counts are known

    def __len__(self):
        return len(self.uid)

    def history(self, r):
        return self.his_items[self.his_ptr[r]:self.his_ptr[r + 1]]


@dataclass
class Dataset:
    name: str
    domain: str            # "movie" or "book": picks the prompt wording
    splits: dict           # split name -> Split
    titles: list           # titles[item id] -> title ('' for id 0)
    user_num: int          # embedding table sizes = max id + 1 over all splits (839 / 3256 on ML-1M)
    item_num: int


# ---------------------------------------------------------------------------------------------
# Loading the authors' pickles


def _id_column(df, col, where):
    """uid / iid as int64. Whole numbers stored as floats pass; anything else is refused, never
    silently truncated (1.5 would otherwise become user 1)."""
    raw = df[col].to_numpy()
    if np.issubdtype(raw.dtype, np.integer):
        return raw.astype(np.int64)
    bad = np.flatnonzero(~np.isfinite(raw) | (raw != np.round(raw))) if np.issubdtype(raw.dtype, np.floating) \
        else np.arange(len(raw))  # strings, objects: not ids
    if len(bad) == 0:
        return raw.astype(np.int64)
    r = bad[0]
    raise UsageError(f"{where}: row {r}: {col} {raw.tolist()[r]!r} is not a whole number (column dtype {raw.dtype}); "
                     f"expected integer ids")


def _frame_to_split(df, where, titles):
    """Check one DataFrame against the schema and turn it into a Split (and fill `titles`)."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise UsageError(f"{where}: missing column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")
    uid, iid = _id_column(df, "uid", where), _id_column(df, "iid", where)
    label = df["label"].to_numpy()
    for col, ids in (("uid", uid), ("iid", iid)):
        bad = np.flatnonzero(ids < 1)
        if len(bad):
            raise UsageError(f"{where}: row {bad[0]}: {col} {ids[bad[0]]} is out of range; ids start at 1 (0 is padding)")
    bad = np.flatnonzero((label != 0) & (label != 1))
    if len(bad):
        raise UsageError(f"{where}: row {bad[0]}: label {label.tolist()[bad[0]]!r}, expected 0 or 1")
    his, his_title = df["his"].tolist(), df["his_title"].tolist()
    lens = np.empty(len(df), np.int64)
    for r, (h, t) in enumerate(zip(his, his_title)):
        if len(h) != len(t):
            raise UsageError(f"{where}: row {r}: history has {len(h)} items but {len(t)} titles")
        if len(h) == 0 or h[0] != 0:  # without the sentinel, dropping h[0] would shift every later row
            raise UsageError(f"{where}: row {r}: history {list(h[:3])} does not start with the 0 sentinel")
        lens[r] = len(h) - 1  # drop the leading 0 sentinel
    flat = np.fromiter((x for h in his for x in h[1:]), np.int64, int(lens.sum()))
    if len(flat) and flat.min() < 1:
        r = int(np.searchsorted(np.cumsum(lens), np.flatnonzero(flat < 1)[0], side="right"))
        raise UsageError(f"{where}: row {r}: history holds item id {flat.min()}; ids start at 1")
    # Titles by item id, from the targets and from the histories (an item may only ever be a history).
    for i, t in zip(iid.tolist(), df["title"].tolist()):
        titles.setdefault(i, str(t))
    for h, t in zip(his, his_title):
        for i, s in zip(h[1:], t[1:]):
            titles.setdefault(int(i), str(s))
    return Split(uid=uid, iid=iid, label=label.astype(np.float32),
                 not_cold=df["not_cold"].to_numpy().astype(bool),
                 his_ptr=np.concatenate([[0], np.cumsum(lens)]), his_items=flat)


def _read_pickle(opener, where):
    import pandas as pd  # only the loader needs pandas: it reads the authors' pickles
    try:
        with opener() as f:
            df = pd.read_pickle(io.BytesIO(f.read()))
    except FileNotFoundError:
        raise UsageError(f"{where}: file not found")
    except Exception as e:  # a pickle can fail in many ways; all mean "not the file we expect"
        raise UsageError(f"{where}: cannot read as a pickled pandas DataFrame ({type(e).__name__}: {e})")
    if not isinstance(df, pd.DataFrame):
        raise UsageError(f"{where}: holds a {type(df).__name__}, expected a pandas DataFrame")
    return df


def _find_split_files(name, root):
    """Return {split: (opener, printable path)} for the first source that has all four pickles."""
    folder = name if os.path.isdir(name) else os.path.join(root, name)
    name = os.path.basename(os.path.normpath(folder))
    files = {s: os.path.join(folder, f"{s}_ood2.pkl") for s in SPLITS}
    if all(os.path.exists(p) for p in files.values()):
        return {s: (lambda p=p: open(p, "rb"), p) for s, p in files.items()}
    zpath = folder + ".zip"
    if os.path.exists(zpath):
        try:
            zf = zipfile.ZipFile(zpath)
        except zipfile.BadZipFile:
            raise UsageError(f"{zpath}: not a zip file")
        inner = {s: f"{name}/{s}_ood2.pkl" for s in SPLITS}
        if all(p in zf.namelist() for p in inner.values()):
            return {s: (lambda p=p: zf.open(p), f"{zpath}:{p}") for s, p in inner.items()}
    if name == "ml-1m":
        raw = [os.path.join(folder, f) for f in ("ratings.dat", "movies.dat")]
        if not all(os.path.exists(p) for p in raw):
            _download_grouplens(folder, root)
        build_ml1m_split(folder, folder)
        return {s: (lambda p=p: open(p, "rb"), p) for s, p in files.items()}
    missing = [p for p in files.values() if not os.path.exists(p)]
    raise UsageError(f"--data {name}: no {', '.join(missing)} and no {zpath}")


def load_dataset(name="ml-1m", root=None):
    """Load the four splits of a dataset into numpy (see the module docstring for where from)."""
    sources = _find_split_files(name, data_root(root))
    titles, splits = {}, {}
    for s, (opener, where) in sources.items():
        splits[s] = _frame_to_split(_read_pickle(opener, where), where, titles)
    user_num = 1 + max(int(sp.uid.max()) for sp in splits.values())
    item_num = 1 + max(int(sp.iid.max()) for sp in splits.values())
    for s, sp in splits.items():
        if len(sp.his_items) and sp.his_items.max() >= item_num:
            raise UsageError(f"{sources[s][1]}: history item id {sp.his_items.max()} is beyond the largest "
                             f"target item id {item_num - 1}")
    table = [""] * item_num
    for i, t in titles.items():
        table[i] = t
    # Warm = user AND item each have more than 3 train rows (SPEC section 6).
    tr = splits["train"]
    u_count = np.bincount(tr.uid, minlength=user_num)
    i_count = np.bincount(tr.iid, minlength=item_num)
    for sp in splits.values():
        sp.warm = (u_count[sp.uid] > 3) & (i_count[sp.iid] > 3)
    base = os.path.basename(os.path.normpath(name))
    return Dataset(name=base, domain="book" if "book" in base.lower() else "movie", splits=splits,
                   titles=table, user_num=user_num, item_num=item_num)


# ---------------------------------------------------------------------------------------------
# Building the split from raw MovieLens-1M (SPEC section 2), exactly as the authors did


def _download_grouplens(folder, root):
    """Fetch GroupLens ml-1m.zip and unpack ratings.dat + movies.dat into `folder`."""
    import urllib.request
    from tqdm import tqdm
    target = os.path.join(root, "ml-1m-grouplens.zip")
    try:
        os.makedirs(folder, exist_ok=True)
        with urllib.request.urlopen(GROUPLENS_URL, timeout=30) as r, open(target + ".tmp", "wb") as f:
            bar = tqdm(total=int(r.headers.get("Content-Length", 0)) or None, unit="B", unit_scale=True,
                       desc="ml-1m.zip")
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
            bar.close()
        os.replace(target + ".tmp", target)
        with zipfile.ZipFile(target) as zf:
            for f in ("ratings.dat", "movies.dat"):
                with open(os.path.join(folder, f), "wb") as out:
                    out.write(zf.read(f"ml-1m/{f}"))
    except Exception as e:  # no network, a proxy, a full disk: all end the same way for the user
        raise UsageError(
            f"--data ml-1m: no split found under {root} and the download failed ({type(e).__name__}); put the "
            f"authors' ml-1m.zip at {os.path.join(root, 'ml-1m.zip')}, or GroupLens ratings.dat + movies.dat in {folder}")


def _read_dat(path, ncols):
    """Read a GroupLens `::`-separated latin-1 file into a list of (line number, fields)."""
    rows = []
    try:
        with open(path, encoding="latin-1") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                fields = line.rstrip("\r\n").split("::")
                if len(fields) != ncols:
                    raise UsageError(f"{path}: line {n}: {len(fields)} '::'-separated fields, expected {ncols}")
                rows.append((n, fields))
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found")
    return rows


def build_ml1m_split(raw_dir, out_dir):
    """ratings.dat + movies.dat -> {train,valid,test,valid_small}_ood2.pkl, the authors' rules:

    months since the first rating month: 14-23 train, 24-28 valid, 29-33 test, the rest dropped;
    label = rating >= 4; one stable sort by (user, time) over the three splits; each row's history is
    every earlier POSITIVE item of that user (so histories cross split boundaries); users renumbered
    1..N by raw id, items 1..M by first appearance in the sorted listing; not_cold = user and item both
    in train; valid_small = valid.sample(frac=0.5, random_state=2023)."""
    import pandas as pd
    titles = {}
    for _, fields in _read_dat(os.path.join(raw_dir, "movies.dat"), 3):
        titles[int(fields[0])] = fields[1]
    ratings = []
    for n, (u, i, r, t) in _read_dat(os.path.join(raw_dir, "ratings.dat"), 4):
        try:
            u, i, r, t = int(u), int(i), int(r), int(t)
        except ValueError:
            raise UsageError(f"{raw_dir}/ratings.dat: line {n}: expected four integers")
        if i in titles:  # an inner join with movies.dat
            d = datetime.fromtimestamp(t, tz=timezone.utc)
            ratings.append((u, i, r, t, (d.year - 2000) * 12 + d.month))
    if not ratings:
        raise UsageError(f"{raw_dir}/ratings.dat: no ratings of movies listed in movies.dat")
    first = min(x[4] for x in ratings)
    split_of = {m: (-1 if m <= 23 else 0 if m <= 28 else 1) for m in range(14, 34)}  # flag: -1/0/1
    kept = [(u, i, r, t, split_of[m - first]) for u, i, r, t, m in ratings if m - first in split_of]
    # train rows, then valid, then test (each in file order), then ONE stable sort by (user, time)
    kept = [x for flag in (-1, 0, 1) for x in kept if x[4] == flag]
    kept.sort(key=lambda x: (x[0], x[3]))
    user_id = {u: k + 1 for k, u in enumerate(sorted({x[0] for x in kept}))}
    item_id = {}
    for x in kept:
        item_id.setdefault(x[1], len(item_id) + 1)
    rows, his, his_title, last_user = [], [], [], None
    for u, i, r, t, flag in kept:
        if u != last_user:  # a new user starts with the sentinel-only history
            his, his_title, last_user = [0], [""], u
        label = int(r >= 4)
        rows.append(dict(uid=user_id[u], iid=item_id[i], label=label, timestamp=t, his=list(his),
                         his_title=list(his_title), title=titles[i], flag=float(flag)))
        if label == 1:
            his.append(item_id[i])
            his_title.append(titles[i])
    df = pd.DataFrame(rows)
    train = df[df.flag == -1]
    warm_u, warm_i = set(train.uid), set(train.iid)
    df["not_cold"] = [int(u in warm_u and i in warm_i) for u, i in zip(df.uid, df.iid)]
    os.makedirs(out_dir, exist_ok=True)
    parts = {"train": df[df.flag == -1], "valid": df[df.flag == 0], "test": df[df.flag == 1]}
    parts["valid_small"] = parts["valid"].sample(frac=0.5, random_state=2023)
    for s, part in parts.items():
        tmp = os.path.join(out_dir, f".{s}_ood2.pkl.tmp")
        part.to_pickle(tmp)
        os.replace(tmp, os.path.join(out_dir, f"{s}_ood2.pkl"))  # atomic: a crash leaves no half file


# ---------------------------------------------------------------------------------------------
# Prompts (SPEC section 3). Templates live in prompts/{movie,book}_{text,collm}.txt.
#
# A prompt is assembled from SEGMENTS, each tokenised once and cached: the template's fixed text,
# one segment per quoted title, and the slots. Two details make the concatenation equal to
# tokenising the whole string at once (tests check this on the real LLaMA and Qwen2 tokenizers):
#   - the space before a placeholder belongs to the segment after it (BPE and SentencePiece both
#     attach a space to the word that follows it);
#   - a punctuation mark right after a title is glued to the title's segment, because both
#     tokenizers merge `)",` or `)".` into one token.
# Slots are single tokens whose input embedding collm.py overwrites, so their positions are known
# by construction, never searched for.

PLACEHOLDERS = ("<ItemTitleList>", "<TargetItemTitle>", "<UserID>", "<TargetItemID>")
NEEDS = {"text": PLACEHOLDERS[:2], "collm": PLACEHOLDERS}
MAX_TITLES = 10           # the last 10 liked items go into the prompt (the reference's choice)
EMPTY_HISTORY = "none"    # the reference writes the typo `unkow` for a user with no liked items yet
SLOT = None               # marks a slot in a segment list


def load_template(domain, mode, path=None):
    """Read a template and check it has every placeholder `mode` needs (and no slot in text mode)."""
    path = path or os.path.join(PROMPT_DIR, f"{domain}_{mode}.txt")
    try:
        with open(path, encoding="utf-8") as f:
            template = f.read().rstrip("\n")
    except OSError as e:
        raise UsageError(f"{path}: cannot read prompt template ({e.strerror})")
    missing = [p for p in NEEDS[mode] if template.count(p) != 1]
    if missing:
        raise UsageError(f"{path}: a {mode} template needs each of {' '.join(NEEDS[mode])} exactly once; "
                         f"wrong count of {' '.join(missing)}")
    extra = [p for p in PLACEHOLDERS if p not in NEEDS[mode] and p in template]
    if extra:
        raise UsageError(f"{path}: a {mode} template must not contain {' '.join(extra)}")
    return template


def prompt_segments(template, history_titles, target_title):
    """The prompt as a list of text segments, with SLOT where a collaborative embedding goes.

    `history_titles` are all the user's liked titles, oldest first; the last MAX_TITLES are used."""
    recent = list(history_titles[-MAX_TITLES:])
    parts = re.split("(" + "|".join(PLACEHOLDERS) + ")", template)  # text, ph, text, ph, text
    segs = [parts[0]]
    for k in range(1, len(parts), 2):
        ph, after = parts[k], parts[k + 1]
        lead = ""
        if segs[-1].endswith(" "):  # the space before a placeholder moves into it
            segs[-1], lead = segs[-1][:-1], " "
        glue = after[:1] if after[:1] in ",.?!;:" else ""  # punctuation right after it joins it
        if ph in ("<UserID>", "<TargetItemID>"):
            segs += [SLOT, after]  # the slot stands for " <UserID>"; nothing is glued to it
            continue
        if ph == "<TargetItemTitle>":
            segs.append(f'{lead}"{target_title}"{glue}')
        elif recent:
            segs += [f'{lead}"{t}",' for t in recent[:-1]] + [f'{lead}"{recent[-1]}"{glue}']
        else:
            segs.append(f"{lead}{EMPTY_HISTORY}{glue}")
        segs.append(after[len(glue):])
    return [s for s in segs if s != ""]


def render_prompt(segments):
    """Segments back to text, the slots written as <UserID> and <TargetItemID> (for --show)."""
    names = iter(("<UserID>", "<TargetItemID>"))
    return "".join(" " + next(names) if s is SLOT else s for s in segments)


class SegmentTokenizer:
    """Tokenise segments once each, as they would tokenise inside a longer text.

    A segment in the middle of a prompt is encoded after a fixed anchor ("\\n") and the anchor's
    tokens are cut off: that stops SentencePiece from adding its start-of-text space and lets BPE see
    the leading space of " \\"Title\\"" as it would in context."""
    ANCHOR = "\n"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.anchor = tokenizer.encode(self.ANCHOR, add_special_tokens=False)
        self.cache = {}
        # BOS: the tokenizer's real one (the reference typed the text "<s>", plain text to Qwen2).
        self.prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        # Any real token id can fill a slot: its embedding is overwritten before the LLM sees it.
        self.slot_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id
        # Pads sit after the last real token and are never attended to: any id works (LLaMA has none).
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)

    def encode(self, seg, first):
        key = (seg, first)
        if key not in self.cache:
            if first:  # the start of the prompt: tokenise as a text start
                ids = self.tok.encode(seg, add_special_tokens=False)
            else:
                ids = self.tok.encode(self.ANCHOR + seg, add_special_tokens=False)
                if ids[:len(self.anchor)] != self.anchor:
                    raise UsageError(f"tokenizer merges the anchor {self.ANCHOR!r} into segment {seg!r}")
                ids = ids[len(self.anchor):]
            self.cache[key] = ids
        return self.cache[key]

    def __call__(self, segments):
        """-> (token ids, slot positions)"""
        ids, slots = list(self.prefix), []
        for k, seg in enumerate(segments):
            if seg is SLOT:
                slots.append(len(ids))
                ids.append(self.slot_id)
            else:
                ids += self.encode(seg, first=(k == 0))
        return ids, slots


@dataclass
class Encoded:
    """All prompts of one split, tokenised: row r is tokens[offsets[r]:offsets[r+1]]."""
    tokens: np.ndarray   # flat int64 token ids
    offsets: np.ndarray  # (N+1,)
    slots: np.ndarray    # (N, 2) positions of the user and item slots; (N, 0) for text prompts

    @property
    def lengths(self):
        return np.diff(self.offsets)


def encode_split(data, split, seg_tok, template):
    """Tokenise every prompt of a split once (about a second on ML-1M train with a fast tokenizer)."""
    sp = data.splits[split]
    tokens, offsets, slots = [], [0], []
    for r in range(len(sp)):
        hist = [data.titles[i] for i in sp.history(r)[-MAX_TITLES:]]
        ids, pos = seg_tok(prompt_segments(template, hist, data.titles[sp.iid[r]]))
        tokens += ids
        offsets.append(len(tokens))
        slots.append(pos)
    return Encoded(tokens=np.asarray(tokens, np.int64), offsets=np.asarray(offsets, np.int64),
                   slots=np.asarray(slots, np.int64).reshape(len(sp), -1))


# ---------------------------------------------------------------------------------------------
# Batches. Prompts differ in length (160-290 LLaMA tokens on ML-1M), so a batch is padded to its
# longest row. Random batches waste about 20% of the compute on padding; grouping rows of similar
# length first ("bucketing") wastes under 5%.


def train_batches(lengths, batch_size, rng, bucket=True, window=64):
    """One epoch of row-index batches: shuffle; then, if bucketing, sort each window of
    `window` batches' worth of rows by length and cut it into batches; finally shuffle the batches,
    so consecutive steps still see unrelated rows."""
    order = rng.permutation(len(lengths))
    if bucket:
        w = batch_size * window
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in np.split(order, range(w, len(order), w))])
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    return [batches[k] for k in rng.permutation(len(batches))]


def eval_batches(lengths, batch_size):
    """Every row exactly once, longest first (a memory problem shows at once), in length order."""
    order = np.argsort(-lengths, kind="stable")
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def padded_history(split, length, rows=None):
    """(len(rows), length) int64: each row's last `length` history items, oldest first, RIGHT-aligned
    and left-padded with 0 (the padding id), so the most recent item is always in the last column
    (SASRec reads its user vector there). An empty history is a row of zeros."""
    rows = np.arange(len(split)) if rows is None else np.asarray(rows)
    end = split.his_ptr[rows + 1]
    keep = np.minimum(end - split.his_ptr[rows], length)      # (N,) how many items fit
    cols = np.arange(length)
    real = cols[None, :] >= (length - keep)[:, None]          # (N, L) True where an item goes
    out = np.zeros((len(rows), length), np.int64)
    out[real] = split.his_items[(end[:, None] - length + cols[None, :])[real]]
    return out


def collate(enc, split, rows, pad_id, his_len=0):
    """Rows -> a right-padded batch of numpy arrays. Right padding keeps every real token at its
    natural position, so the causal mask alone is enough and `last` indexes the answer position.
    his_len > 0 (a collaborative model that reads the history: SASRec, DIN) adds "his", the last
    his_len liked item ids of each row (padded_history); MF and LightGCN batches go without."""
    import torch
    lens = enc.lengths[rows]
    ids = np.full((len(rows), int(lens.max())), pad_id, np.int64)
    for b, r in enumerate(rows):
        ids[b, :lens[b]] = enc.tokens[enc.offsets[r]:enc.offsets[r + 1]]
    mask = np.arange(ids.shape[1])[None, :] < lens[:, None]
    batch = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                 last=torch.from_numpy(lens - 1), slots=torch.from_numpy(enc.slots[rows]),
                 uid=torch.from_numpy(split.uid[rows]), iid=torch.from_numpy(split.iid[rows]),
                 label=torch.from_numpy(split.label[rows]))
    if his_len:
        batch["his"] = torch.from_numpy(padded_history(split, his_len, rows))
    return batch


# ---------------------------------------------------------------------------------------------
# CLI


def print_stats(data):
    print(f"{data.name}: users {data.user_num - 1} (table {data.user_num}), items {data.item_num - 1} "
          f"(table {data.item_num}), domain {data.domain}")
    print(f"{'split':<12}{'rows':>8}{'pos rate':>10}{'cold':>8}{'warm':>8}{'his min':>9}{'his mean':>10}{'his max':>9}")
    for s, sp in data.splits.items():
        h = np.diff(sp.his_ptr)
        print(f"{s:<12}{len(sp):>8,}{sp.label.mean():>10.3f}{1 - sp.not_cold.mean():>8.3f}{sp.warm.mean():>8.3f}"
              f"{h.min():>9}{h.mean():>10.1f}{h.max():>9}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Inspect a CoLLM dataset: split statistics or one row's prompt.")
    p.add_argument("--data", default="ml-1m", help="dataset name under the data root, or a folder (default ml-1m)")
    p.add_argument("--data-root", default=None, help="folder holding datasets (default $COLLM_DATA, else ./data)")
    p.add_argument("--stats", action="store_true", help="print split sizes, positive rates, cold/warm shares, history lengths")
    p.add_argument("--split", default="test", choices=SPLITS, help="split for --show (default test)")
    p.add_argument("--show", type=int, default=None, metavar="ROW", help="print the prompt of this row of --split")
    p.add_argument("--prompt", default="text", choices=("text", "collm"), help="text-only (stage 1) or CoLLM (stage 2) prompt")
    p.add_argument("--template", default=None, help="a template file to use instead of prompts/<domain>_<prompt>.txt")
    a = p.parse_args(argv)
    if a.stats is False and a.show is None:
        raise UsageError("nothing to do: give --stats and/or --show ROW")
    data = load_dataset(a.data, a.data_root)
    if a.stats:
        print_stats(data)
    if a.show is not None:
        template = load_template(data.domain, a.prompt, a.template)
        sp = data.splits[a.split]
        if not 0 <= a.show < len(sp):
            raise UsageError(f"--show {a.show}: {a.split} has rows 0..{len(sp) - 1}")
        hist = [data.titles[i] for i in sp.history(a.show)]
        print(render_prompt(prompt_segments(template, hist, data.titles[sp.iid[a.show]])))


if __name__ == "__main__":
    cli_main(main)
