"""data.py: splits, prompts, tokens and batches for CoLLM (paper sections 3.1 and 4.1).

Chapter one. The authors' split pickles become numpy arrays (load_dataset), each row the paper's
Yes/No prompt (prompt_segments), tokenised once (encode_split) and cut into padded batches
(train_batches, collate); no torch model, no LLM. It also holds what every later chapter shares: the
error a CLI prints as one `error:` line (UsageError) and the atomic writer (write_atomic).

    python tools/prepare.py --data ml-1m --stats                  # split sizes, positive rates, cold shares
    python tools/prepare.py --data ml-1m --show 5 --prompt collm  # test row 5's prompt text

Where a split is read from (`--data NAME_OR_DIR`, root = `--data-root`, else $COLLM_DATA, else ./data):
  1. `<root>/<name>/{train,valid,test,valid_small}_ood2.pkl`: the authors' pickles;
  2. `<root>/<name>.zip` holding them (the released ml-1m.zip), read in place: a read-only folder works;
  3. what `python tools/prepare.py --data NAME` built by the authors' rules from raw files in `<root>/<name>/`
     (GroupLens ratings.dat + movies.dat; Amazon 2018 Books_5.json.gz + meta_Books.json.gz), cached
     ($COLLM_CACHE, else ~/.cache/collm) named by their sizes and times: a changed one is never ignored.
tools/prepare.py also downloads what is missing; this chapter never touches the network.
"""
import hashlib
import io
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "valid", "test", "valid_small")
COLUMNS = ("uid", "iid", "label", "his", "his_title", "title", "not_cold")
PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
# The datasets tools/prepare.py can build from raw files, and the files each needs
RAW_FILES = {"ml-1m": ("ratings.dat", "movies.dat"), "amazon-book": ("Books_5.json.gz", "meta_Books.json.gz")}
BUILD_VERSION = 2  # part of a build's cache name: bump it when a builder's output changes

# ---------------------------------------------------------------------------------------------
# What every chapter shares: the one error type, the dataset flags, atomic writes


class UsageError(Exception):
    """Bad input from the user (a file, a row, a flag): the one exception type this toolkit defines."""


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

# The two flags that choose a dataset, worded once for every CLI (train.py's Config reads them too).
DATA_FLAGS = {"data": ("ml-1m", "dataset name under the data root, or a dataset folder (default ml-1m)"),
              "data_root": (None, "folder holding datasets (default $COLLM_DATA, else ./data)")}


def add_data_flags(parser):
    """--data and --data-root on an argparse parser, as DATA_FLAGS says."""
    for name, (default, help) in DATA_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), default=default, help=help)


def write_atomic(path, write):
    """write(tmp) makes a file or folder at a temporary name, renamed to `path` in one step: a crash never
    leaves half a file there. An empty folder at `path` is replaced (not every system renames over one)."""
    tmp = f"{path}.tmp{os.getpid()}"  # the final name in front: torch.save refuses some dot-names
    remove_stale_temporaries(path)  # what killed earlier writes of the same path left behind
    try:
        write(tmp)
        if os.path.isdir(path) and not os.listdir(path) and os.path.isdir(tmp):
            os.rmdir(path)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(path):
    """Remove `path.tmpPID` files and folders of writes killed mid-way (they never reach `finally`): no
    process has that id, or ours does (ids are reused). A live writer's temporary is left alone."""
    folder, base = os.path.split(os.path.abspath(path))
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        m = re.fullmatch(re.escape(base) + r"\.tmp(\d+)", name)
        if m and (int(m.group(1)) == os.getpid() or not process_alive(int(m.group(1)))):
            stale = os.path.join(folder, name)
            if os.path.isdir(stale):  # a folder: an export, a converted model, a split being built
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.remove(stale)


def process_alive(pid):
    """True if a process with this id runs on this machine (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


# ---------------------------------------------------------------------------------------------
# Finding a dataset's four pickles: a folder, a zip, or a build of tools/prepare.py in the cache


def _pickles_in(folder):
    """{split: (opener, printable path)} if `folder` holds all four pickles, else None."""
    files = {s: os.path.join(folder, f"{s}_ood2.pkl") for s in SPLITS}
    if all(os.path.exists(p) for p in files.values()):
        return {s: (lambda p=p: open(p, "rb"), p) for s, p in files.items()}
    return None


def _pickles_in_zip(zpath, name):
    """The same inside a zip, read in place: `<name>/<split>_ood2.pkl`, else the four pickles in the
    zip's only folder that has them (people zip the book split as `book/`, or with no folder)."""
    try:
        zf = zipfile.ZipFile(zpath)
    except zipfile.BadZipFile:
        raise UsageError(f"{zpath}: not a zip file")
    names = set(zf.namelist())
    folders = sorted({n[:-len(f"{s}_ood2.pkl")] for n in names for s in SPLITS if n.endswith(f"/{s}_ood2.pkl")
                      or n == f"{s}_ood2.pkl"})  # every folder holding any of the four ("" = the zip's top)
    complete = [f for f in folders if all(f"{f}{s}_ood2.pkl" in names for s in SPLITS)]
    folder = f"{name}/" if f"{name}/" in complete else complete[0] if len(complete) == 1 else None
    if folder is None and folders and not complete:  # some of a split, not all: say which pickle is missing
        f = f"{name}/" if f"{name}/" in folders else folders[0]
        missing = [f"{f}{s}_ood2.pkl" for s in SPLITS if f"{f}{s}_ood2.pkl" not in names]
        have = [f"{f}{s}_ood2.pkl" for s in SPLITS if f"{f}{s}_ood2.pkl" in names]
        raise UsageError(f"{zpath}: holds {', '.join(have)} but no {', '.join(missing)}; a dataset zip needs all "
                         f"four pickles")
    if folder is None:
        return None
    inner = {s: f"{folder}{s}_ood2.pkl" for s in SPLITS}
    return {s: (lambda p=p: zf.open(p), f"{zpath}:{p}") for s, p in inner.items()}


def find_split_files(name, root):
    """-> ({split: (opener, printable path)}, where the split came from, in words), from the first
    source that has it: pickles, a zip of them, tools/prepare.py's build of the raw files."""
    folder = name if os.path.isdir(name) else os.path.join(root, name)
    name = os.path.basename(os.path.normpath(folder))
    zpath = folder + ".zip"
    if found := _pickles_in(folder):
        return found, f"the four pickles in {folder}"
    if os.path.exists(zpath) and (found := _pickles_in_zip(zpath, name)):
        return found, f"the four pickles in {zpath}"
    raw = [os.path.join(folder, f) for f in RAW_FILES.get(name, ())]
    if raw and all(os.path.exists(p) for p in raw) and (found := _pickles_in(built_folder(name, raw))):
        return found, f"built by tools/prepare.py from {' + '.join(raw)} (cached in {built_folder(name, raw)})"
    missing = [p for p in (os.path.join(folder, f"{s}_ood2.pkl") for s in SPLITS) if not os.path.exists(p)]
    how = f"; python tools/prepare.py --data {name} builds it from raw files or downloads it" if raw else ""
    raise UsageError(f"--data {name}: no {', '.join(missing)} and no {zpath}{how}")


def cache_dir():
    """$COLLM_CACHE, else ~/.cache/collm: where splits built from raw files are kept."""
    return os.environ.get("COLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "collm")


def built_folder(name, raw):
    """The cache folder of tools/prepare.py's build from the raw files `raw`, named by a hash of their
    paths, sizes and modification times (and BUILD_VERSION): a changed raw file means a new build."""
    stamp = [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in raw]
    key = hashlib.sha1(repr((BUILD_VERSION, stamp)).encode()).hexdigest()[:12]
    return os.path.join(cache_dir(), f"{name}-{key}")


# ---------------------------------------------------------------------------------------------
# In-memory form: one Split per file, numpy arrays only; and loading the authors' pickles into it


@dataclass
class Split:
    """One split, one row per (user, item, label) interaction. Histories are ragged, so stored flat: row
    r's liked items, oldest first, are `his_items[his_ptr[r]:his_ptr[r+1]]` (leading 0 sentinel dropped)."""
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
    source: str = ""       # where the split came from, in words (pickles, a zip, a build from raw files)


def _id_column(df, col, where):
    """uid / iid as int64: whole numbers stored as floats pass, anything else is refused (1.5 is not user 1)."""
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
        for col, value in (("his", h), ("his_title", t)):  # a NaN cell (a lost list) has no len()
            if not isinstance(value, (list, tuple, np.ndarray)):
                raise UsageError(f"{where}: row {r}: {col} is {value!r}, expected a list (the 0 sentinel first)")
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
    return Split(uid=uid, iid=iid, label=label.astype(np.float32), not_cold=df["not_cold"].to_numpy().astype(bool),
                 his_ptr=np.concatenate([[0], np.cumsum(lens)]), his_items=flat)


def _read_pickle(opener, where):
    """One split file -> its pandas DataFrame; every way it can fail is one UsageError naming `where`."""
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


def load_dataset(name="ml-1m", root=None):
    """Load the four splits of a dataset into numpy (see the module docstring for where from)."""
    sources, source = find_split_files(name, data_root(root))
    titles, splits = {}, {}
    for s, (opener, where) in sources.items():
        splits[s] = _frame_to_split(_read_pickle(opener, where), where, titles)
    user_num = 1 + max((int(sp.uid.max()) for sp in splits.values() if len(sp)), default=0)
    item_num = 1 + max((int(sp.iid.max()) for sp in splits.values() if len(sp)), default=0)
    for s, sp in splits.items():
        if len(sp.his_items) and sp.his_items.max() >= item_num:
            raise UsageError(f"{sources[s][1]}: history item id {sp.his_items.max()} is beyond the largest "
                             f"target item id {item_num - 1}")
    table = [""] * item_num
    for i, t in titles.items():
        table[i] = t
    # Warm = user AND item each have more than 3 train rows (the paper's warm/cold evaluation; README, Results).
    tr = splits["train"]
    u_count, i_count = np.bincount(tr.uid, minlength=user_num), np.bincount(tr.iid, minlength=item_num)
    for sp in splits.values():
        sp.warm = (u_count[sp.uid] > 3) & (i_count[sp.iid] > 3)
    base = os.path.basename(os.path.normpath(name))
    return Dataset(name=base, domain="book" if "book" in base.lower() else "movie", splits=splits,
                   titles=table, user_num=user_num, item_num=item_num, source=source)


def items_in_data(data):
    """-> (item_num,) bool: the ids that occur in the data, as a target or in a history (titles may be '')."""
    seen = np.zeros(data.item_num, bool)
    for sp in data.splits.values():
        seen[sp.iid] = True
        seen[sp.his_items] = True
    return seen


def fingerprint(ds):
    """A short hash of which (user, item, label) rows each split holds, in order: it tells a model trained
    on another split of equal table sizes (collab.py records it, train.py checks it)."""
    h = hashlib.sha1()
    for s in SPLITS:
        sp = ds.splits[s]
        for column in (sp.uid, sp.iid, sp.label):
            h.update(np.ascontiguousarray(column).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Prompts: the paper's Yes/No question, worded as the reference's (prompts/{movie,book}_{text,collm}.txt).
# A prompt is assembled from SEGMENTS, each tokenised once and cached: the template's fixed text, one
# segment per quoted title, and the slots. Two details make the concatenation equal to tokenising the
# whole string at once (tests check this on the real LLaMA and Qwen2 tokenizers, SentencePiece and BPE):
#   - the space before a placeholder belongs to the segment after it (both attach it to the next word);
#   - a punctuation mark right after a title joins the title's segment (both merge `)",` or `)".`).
# Slots are single tokens whose input embedding collm.py overwrites: their positions are known by construction.

PLACEHOLDERS = ("<ItemTitleList>", "<TargetItemTitle>", "<UserID>", "<TargetItemID>")
NEEDS = {"text": PLACEHOLDERS[:2], "collm": PLACEHOLDERS}
MAX_TITLES = 10           # the last 10 liked items go into the prompt (the reference's choice)
EMPTY_HISTORY = "none"    # the reference writes the typo `unkow` for a user with no liked items yet
SLOT = None               # marks a slot in a segment list
GLUE = ",.?!;:"           # a punctuation mark right after a title joins the title's segment


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
    """The prompt as a list of text segments, with SLOT where a collaborative embedding goes;
    `history_titles`: all the user's liked titles, oldest first (the last MAX_TITLES are used)."""
    recent = list(history_titles[-MAX_TITLES:])
    parts = re.split("(" + "|".join(PLACEHOLDERS) + ")", template)  # text, ph, text, ph, text
    segs = [parts[0]]
    for k in range(1, len(parts), 2):
        ph, after = parts[k], parts[k + 1]
        lead = ""
        if segs[-1].endswith(" "):  # the space before a placeholder moves into it
            segs[-1], lead = segs[-1][:-1], " "
        glue = after[:1] if after[:1] in GLUE else ""  # punctuation right after it joins it
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
    """Tokenise segments once each, as they would tokenise inside a longer text: a segment in the middle
    of a prompt is encoded after a fixed anchor ("\\n") whose tokens are cut off, which stops
    SentencePiece adding its start-of-text space and lets BPE see a leading space as in context."""
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
        """One segment's token ids, tokenised once and cached; `first`: the segment opens the prompt."""
        key = (seg, first)
        if key not in self.cache:
            ids = self.tok.encode(seg if first else self.ANCHOR + seg, add_special_tokens=False)
            if not first:
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
    shared: np.ndarray   # (N,) tokens before the target item's title: they depend on the user alone

    @property
    def lengths(self):
        return np.diff(self.offsets)


def encode_split(data, split, seg_tok, template):
    """Tokenise every prompt of a split once. Each row also records how many of its first tokens do not
    depend on the target item (where the same prompt about two made-up titles "A", "B" stops agreeing):
    every row of one history gets the same number, and scoring runs those tokens once for all of them."""
    sp = data.splits[split]
    tokens, offsets, slots, shared = [], [0], [], []
    for r in range(len(sp)):
        hist = [data.titles[i] for i in sp.history(r)[-MAX_TITLES:]]
        ids, pos = seg_tok(prompt_segments(template, hist, data.titles[sp.iid[r]]))
        about_a, about_b = (seg_tok(prompt_segments(template, hist, t))[0] for t in "AB")  # segments cached: nearly free
        n = min(len(about_a), len(about_b), len(ids) - 1)  # the last token always runs with the target's own tokens
        differ = np.flatnonzero(np.asarray(about_a[:n]) != np.asarray(about_b[:n]))
        shared.append(int(differ[0]) if len(differ) else n)
        tokens += ids
        offsets.append(len(tokens))
        slots.append(pos)
    return Encoded(tokens=np.asarray(tokens, np.int64), offsets=np.asarray(offsets, np.int64),
                   slots=np.asarray(slots, np.int64).reshape(len(sp), -1), shared=np.asarray(shared, np.int64))


# ---------------------------------------------------------------------------------------------
# Batches. Prompts differ in length, so a batch is padded to its longest row: grouping rows of similar
# length first ("bucketing") wastes little compute on padding (tools/bench.py reports the share).


def train_batches(lengths, batch_size, rng, bucket=True, window=64):
    """One epoch of row-index batches: shuffle; if bucketing, sort each window of `window` batches' worth
    of rows by length; cut into batches and shuffle those, so consecutive steps see unrelated rows."""
    order = rng.permutation(len(lengths))
    if bucket:
        w = batch_size * window
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in np.split(order, range(w, len(order), w))])
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    return [batches[k] for k in rng.permutation(len(batches))]


def eval_batches(lengths, batch_size, shared=None, groups=None):
    """Every row once, longest first (a memory problem shows at once); given prefix groups (prefix_groups),
    longest prefix first with each group's rows side by side, so the model runs each prefix once."""
    order = np.argsort(-lengths, kind="stable") if groups is None else np.lexsort((-lengths, groups, -shared))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def prefix_groups(enc, rows):
    """-> (len(rows),) group ids, one per distinct run of tokens before the target title (user + history)."""
    ids = {}
    return np.array([ids.setdefault(enc.tokens[start:start + n].tobytes(), len(ids))
                     for start, n in zip(enc.offsets[rows], enc.shared[rows])])


def padded_history(split, length, rows=None):
    """(len(rows), length) int64: each row's last `length` history items, oldest first, RIGHT-aligned and
    left-padded with 0, so the most recent is always in the last column (SASRec reads its user vector there)."""
    rows = np.arange(len(split)) if rows is None else np.asarray(rows)
    end = split.his_ptr[rows + 1]
    keep = np.minimum(end - split.his_ptr[rows], length)      # (N,) how many items fit
    cols = np.arange(length)
    real = cols[None, :] >= (length - keep)[:, None]          # (N, L) True where an item goes
    out = np.zeros((len(rows), length), np.int64)
    out[real] = split.his_items[(end[:, None] - length + cols[None, :])[real]]
    return out


def collate(enc, split, rows, pad_id, his_len=0):
    """Rows -> a right-padded batch of tensors: every real token keeps its natural position, so the
    causal mask alone is enough and `last` indexes the answer position. his_len > 0 (SASRec, DIN) adds
    "his", each row's last his_len liked item ids (padded_history)."""
    import torch
    lens = enc.lengths[rows]
    ids = np.full((len(rows), int(lens.max())), pad_id, np.int64)
    for b, r in enumerate(rows):
        ids[b, :lens[b]] = enc.tokens[enc.offsets[r]:enc.offsets[r + 1]]
    mask = np.arange(ids.shape[1])[None, :] < lens[:, None]
    batch = dict(input_ids=ids, attention_mask=mask.astype(np.int64), last=lens - 1, slots=enc.slots[rows],
                 shared=enc.shared[rows], uid=split.uid[rows], iid=split.iid[rows], label=split.label[rows])
    if his_len:
        batch["his"] = padded_history(split, his_len, rows)
    return {k: torch.from_numpy(v) for k, v in batch.items()}
