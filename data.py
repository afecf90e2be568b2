"""data.py: datasets, splits, prompts and batches for CoLLM (paper sections 3.1 and 4.1).

Chapter one of the toolkit. It turns the authors' released splits (or the raw MovieLens-1M and
Amazon-Book files) into plain numpy arrays, builds the Yes/No prompts of the paper, tokenises them
once, and cuts them into padded batches. Nothing here imports torch models or the LLM: every other
file builds on this one.

    python data.py --data ml-1m --stats                           # split sizes, positive rates, cold shares
    python data.py --data ml-1m --split test --show 5 --prompt collm   # row 5's prompt text
    python data.py --data amazon-book --stats                     # the paper's second dataset

Where data comes from (`--data NAME_OR_DIR`, root = `--data-root`, else $COLLM_DATA, else ./data):
  1. `<root>/<name>/{train,valid,test,valid_small}_ood2.pkl`: the authors' pickles;
  2. `<root>/<name>.zip` holding those pickles (the released ml-1m.zip), read in place, never unpacked,
     so a read-only data folder works;
  3. raw files in `<root>/<name>/`, turned into the same four pickles by the authors' rules (their
     notebooks dataset/*/processing_ood.ipynb) and kept in a cache ($COLLM_CACHE, else ~/.cache/collm)
     under a name that records the raw files' sizes and times:
       ml-1m:        GroupLens `ratings.dat` + `movies.dat`                     (build_ml1m_split)
       amazon-book:  Amazon 2018 `Books_5.json.gz` + `meta_Books.json.gz`       (build_amazon_book_split);
  4. with none of these, a download when the network allows: for ml-1m the authors' ml-1m.zip
     (the exact split) into `<root>/`, else the GroupLens files; for amazon-book the two raw files.
     A download never replaces a file that is already there.
"""
import argparse
import hashlib
import io
import os
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

SPLITS = ("train", "valid", "test", "valid_small")
COLUMNS = ("uid", "iid", "label", "his", "his_title", "title", "not_cold")
PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
# Downloads, tried only when a dataset has neither pickles nor raw files (see _find_split_files)
AUTHORS_ZIP_URL = "https://github.com/zyang1580/CoLLM/raw/HEAD/collm-datasets/ml-1m.zip"  # the exact split
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
AMAZON_URLS = {  # Amazon Review Data 2018, "5-core" Books reviews and Books metadata
    "Books_5.json.gz": "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_v2/categoryFilesSmall/Books_5.json.gz",
    "meta_Books.json.gz": "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_v2/metaFiles2/meta_Books.json.gz"}
BUILD_VERSION = 2  # part of the cache key: bump it when a builder's output changes


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


# The two flags that choose a dataset, worded once for every CLI (train.py's Config reads them too).
DATA_FLAGS = {"data": ("ml-1m", "dataset name under the data root, or a dataset folder (default ml-1m)"),
              "data_root": (None, "folder holding datasets (default $COLLM_DATA, else ./data)")}


def add_data_flags(parser):
    """--data and --data-root on an argparse parser, as DATA_FLAGS says."""
    for name, (default, help) in DATA_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), default=default, help=help)


def write_atomic(path, write):
    """write(tmp) creates a file or a folder at a temporary name beside `path`, which is then renamed
    to `path` in one step: a crash or an error never leaves half a file under the real name, and the
    temporary is removed whatever happens. The one way this toolkit writes what it keeps (pickles,
    checkpoints, metrics.json, exports, converted models). An empty folder at `path` is replaced
    (a rename cannot replace a folder on every system); anything else there makes the rename fail."""
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
    """Remove `path.tmpPID` files and folders whose writer is gone: a write killed mid-way (kill -9,
    a power cut) never reaches its `finally`, and without this its temporary stayed forever. A
    writer is gone when no process on this machine has its id; one with our own id is an earlier
    write of ours that died the same way (ids are reused). A live writer's temporary is left alone."""
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
    source: str = ""       # where the split came from, in words (pickles, a zip, a build from raw files)


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


def _find_split_files(name, root):
    """-> ({split: (opener, printable path)}, where the split came from, in words), from the first
    source that has it: pickles, a zip of them, raw files (built once into the cache), a download."""
    folder = name if os.path.isdir(name) else os.path.join(root, name)
    name = os.path.basename(os.path.normpath(folder))
    zpath = folder + ".zip"
    if found := _pickles_in(folder):
        raw = [f for f in RAW.get(name, ((),))[0] if os.path.exists(os.path.join(folder, f))]
        # earlier versions built their pickles beside the raw files: say that those are not read
        return found, f"the four pickles in {folder}" + (f" ({' + '.join(raw)} there unused)" if raw else "")
    if os.path.exists(zpath) and (found := _pickles_in_zip(zpath, name)):
        return found, f"the four pickles in {zpath}"
    if name not in RAW:
        missing = [p for p in (os.path.join(folder, f"{s}_ood2.pkl") for s in SPLITS) if not os.path.exists(p)]
        raise UsageError(f"--data {name}: no {', '.join(missing)} and no {zpath}")
    files, build, download = RAW[name]
    raw = [os.path.join(folder, f) for f in files]
    absent = [f for f, p in zip(files, raw) if not os.path.exists(p)]
    if absent and len(absent) < len(files):  # the user's own folder: report, never download into it
        raise UsageError(f"--data {name}: {folder} holds {' + '.join(f for f in files if f not in absent)} but "
                         f"no {' + '.join(absent)}; put {' and '.join(absent)} there too")
    if absent:
        found = download(folder, zpath, root)  # pickles (a zip) or None once the raw files are in place
        if found:
            return found
    out = _cached_build(name, raw, build)
    return _pickles_in(out), f"built by {build.__name__} from {' + '.join(raw)} (cached in {out})"


def load_dataset(name="ml-1m", root=None):
    """Load the four splits of a dataset into numpy (see the module docstring for where from)."""
    sources, source = _find_split_files(name, data_root(root))
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
    u_count = np.bincount(tr.uid, minlength=user_num)
    i_count = np.bincount(tr.iid, minlength=item_num)
    for sp in splits.values():
        sp.warm = (u_count[sp.uid] > 3) & (i_count[sp.iid] > 3)
    base = os.path.basename(os.path.normpath(name))
    return Dataset(name=base, domain="book" if "book" in base.lower() else "movie", splits=splits,
                   titles=table, user_num=user_num, item_num=item_num, source=source)


def fingerprint(ds):
    """A short hash of which (user, item, label) rows each split holds, in order: what a model
    trained on this data learned from. Two datasets with the same table sizes (another seed of a
    build, another cut of the same ratings) fit each other's embedding tables, so sizes alone cannot
    tell a collaborative model trained elsewhere; this can (collab.py records it, train.py checks it)."""
    h = hashlib.sha1()
    for s in SPLITS:
        sp = ds.splits[s]
        for column in (sp.uid, sp.iid, sp.label):
            h.update(np.ascontiguousarray(column).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Raw files -> the authors' four pickles, built once into a cache. The cache folder's name is a hash
# of the raw files' paths, sizes and modification times, so a changed raw file is rebuilt, never
# silently ignored, and nothing is written beside the raw files (a read-only data folder works).


def cache_dir():
    """$COLLM_CACHE, else ~/.cache/collm: where splits built from raw files are kept."""
    return os.environ.get("COLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "collm")


def _cached_build(name, raw, build):
    """Run `build(raw folder, out folder)` once per version of the raw files; return the out folder.
    The build writes into a temporary folder renamed into place at the end, so a failed or
    interrupted build leaves nothing that a later run could mistake for a split."""
    stamp = [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in raw]
    key = hashlib.sha1(repr((BUILD_VERSION, stamp)).encode()).hexdigest()[:12]
    out = os.path.join(cache_dir(), f"{name}-{key}")
    if _pickles_in(out):
        return out

    def build_into(tmp):
        try:
            os.makedirs(tmp)
        except OSError as e:
            raise UsageError(f"cannot create {tmp} to build --data {name} into ({e.strerror}); "
                             f"set $COLLM_CACHE to a writable folder")
        build(os.path.dirname(raw[0]), tmp)
        with open(os.path.join(tmp, "raw_files.txt"), "w") as f:  # for a human wondering what this is
            f.write("".join(f"{p}\t{size} bytes\tmtime_ns {mtime}\n" for p, size, mtime in stamp))

    try:
        write_atomic(out, build_into)
    except OSError:  # the rename failed: another run finished the same build first, so use its copy
        if not os.path.isdir(out):  # no: a real error of the build itself
            raise
        if not _pickles_in(out):
            raise UsageError(f"{out} exists but does not hold the four pickles; remove it and run again")
    return out


def _fetch(url, f, desc):
    """Copy `url` into the open binary file `f`, with a progress bar."""
    import urllib.request
    from tqdm import tqdm
    with urllib.request.urlopen(url, timeout=30) as r:
        bar = tqdm(total=int(r.headers.get("Content-Length", 0)) or None, unit="B", unit_scale=True, desc=desc)
        while chunk := r.read(1 << 20):
            f.write(chunk)
            bar.update(len(chunk))
        bar.close()


def _download(url, target):
    """Download `url` to `target`, which must not exist: the bytes go to a temporary file that is
    then linked to `target`, so a file the user put there is never replaced, and a broken
    download never leaves a half file under the real name."""
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target) or ".", prefix=".download-")
    try:
        with os.fdopen(fd, "wb") as f:
            _fetch(url, f, os.path.basename(target))
        try:
            os.link(tmp, target)  # FileExistsError if something is there
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links
            if os.path.exists(target):
                raise FileExistsError(target)
            os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _download_ml1m(folder, zpath, root):
    """No split and no raw files: fetch the authors' ml-1m.zip (the exact split), else the GroupLens
    raw files. Returns the zip's pickles, or None when the raw files are now in `folder`."""
    failed = []
    try:
        _download(AUTHORS_ZIP_URL, zpath)
        found = _pickles_in_zip(zpath, "ml-1m")
        if found:
            return found, f"the four pickles in {zpath} (downloaded from {AUTHORS_ZIP_URL})"
        os.remove(zpath)  # ours, and not what we expected: go on to GroupLens
        failed.append("the authors' zip holds no ml-1m/*_ood2.pkl")
    except UsageError as e:  # a bad zip we just downloaded
        os.remove(zpath)
        failed.append(str(e))
    except Exception as e:  # no network, a proxy, a full disk: all end the same way for the user
        failed.append(f"{AUTHORS_ZIP_URL}: {type(e).__name__}")
    try:
        with tempfile.TemporaryFile() as f:
            _fetch(GROUPLENS_URL, f, "GroupLens ml-1m.zip")
            with zipfile.ZipFile(f) as zf:
                contents = {n: zf.read(f"ml-1m/{n}") for n in RAW["ml-1m"][0]}
        os.makedirs(folder, exist_ok=True)
        for n, blob in contents.items():
            with open(os.path.join(folder, n), "xb") as out:  # "x": never over a file of the user's
                out.write(blob)
        return None
    except Exception as e:
        failed.append(f"{GROUPLENS_URL}: {type(e).__name__}")
    raise UsageError(
        f"--data ml-1m: no split found under {root} and the download failed ({'; '.join(failed)}); put the "
        f"authors' ml-1m.zip at {zpath}, or GroupLens ratings.dat + movies.dat in {folder}")


def _download_amazon(folder, zpath, root):
    """No split and no raw files: fetch the two Amazon Review Data 2018 files into `folder`."""
    done = []
    try:
        for name, url in AMAZON_URLS.items():
            _download(url, os.path.join(folder, name))
            done.append(os.path.join(folder, name))
        return None
    except Exception as e:
        for p in done:  # both files or neither: a lone file would block the next run
            os.remove(p)
        raise UsageError(
            f"--data amazon-book: no split found under {root} and the download failed ({type(e).__name__}); put the "
            f"authors' four *_ood2.pkl in {folder} (or zipped as {zpath}), or the Amazon Review Data 2018 files "
            f"{' + '.join(AMAZON_URLS)} in {folder}")


# ---------------------------------------------------------------------------------------------
# The authors' rules shared by both datasets (their notebooks dataset/*/processing_ood.ipynb):
# after the rows are ordered and labelled, one pass writes histories, not_cold and the pickles.


def _write_authors_split(uid, iid, label, ts, flag, title, out_dir, small_frac, where):
    """Rows (final 1-based ids, label 0/1, unix time, flag -1/0/1 = train/valid/test), ALREADY in the
    listing order: the three splits concatenated and stably sorted by (user, time). `title[iid]` is
    an item's title. Each row's history is `[0]` + every earlier positive item of that user (across
    splits, duplicates kept); not_cold = user and item both have a train row. Writes the four
    pickles in the authors' column order; valid_small = valid.sample(frac=small_frac, random_state=2023)."""
    import pandas as pd
    his_col, his_title_col, his, his_title, last = [], [], [], [], None
    for u, i, y in zip(uid, iid, label):
        if u != last:  # a new user starts with the sentinel-only history
            his, his_title, last = [0], [""], u
        his_col.append(list(his))
        his_title_col.append(list(his_title))
        if y == 1:
            his.append(i)
            his_title.append(title[i])
    train_users = {u for u, f in zip(uid, flag) if f == -1}
    train_items = {i for i, f in zip(iid, flag) if f == -1}
    df = pd.DataFrame(dict(
        uid=np.asarray(uid, np.int64), iid=np.asarray(iid, np.int64), label=np.asarray(label, np.int64),
        timestamp=np.asarray(ts, np.int64), his=his_col, his_title=his_title_col, title=[title[i] for i in iid],
        flag=np.asarray(flag, np.float64),
        not_cold=np.asarray([int(u in train_users and i in train_items) for u, i in zip(uid, iid)], np.int64)))
    parts = {"train": df[df.flag == -1], "valid": df[df.flag == 0], "test": df[df.flag == 1]}
    empty = [s for s, p in parts.items() if len(p) == 0]
    if empty:
        raise UsageError(f"{where}: the authors' rules leave no {' and no '.join(empty)} rows; "
                         f"these are not the expected raw files")
    parts["valid_small"] = parts["valid"].sample(frac=small_frac, random_state=2023)
    os.makedirs(out_dir, exist_ok=True)
    for s, part in parts.items():
        write_atomic(os.path.join(out_dir, f"{s}_ood2.pkl"), lambda tmp: part.to_pickle(tmp, compression=None))


# ---------------------------------------------------------------------------------------------
# Raw MovieLens-1M, as the authors' notebook dataset/ml-1m/processing_ood.ipynb did it


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

    ratings joined to movies.dat (rows grouped by movie, see below); months since the first rating
    month: 14-23 train, 24-28 valid, 29-33 test, the rest dropped; label = rating >= 4; one stable
    sort by (user, time) over the three splits; each row's history is every earlier POSITIVE item of
    that user (so histories cross split boundaries); users renumbered 1..N by raw id, items 1..M by
    first appearance in the sorted listing; not_cold = user and item both in train;
    valid_small = valid.sample(frac=0.5, random_state=2023)."""
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
    # The join order. The notebook's `pd.merge(rating, item_info, on='iid', how='inner')` ran on a pandas
    # that returned the rows GROUPED BY MOVIE, movies in the order of their first line in ratings.dat,
    # file order inside a movie (today's pandas keeps ratings.dat's order). The stable (user, time)
    # sort below keeps this order for one user's ratings within one second (26,379 rows of the
    # release), so it decides their histories and the item numbering: rebuild it explicitly.
    first_line = {}
    for k, x in enumerate(ratings):
        first_line.setdefault(x[1], k)
    ratings.sort(key=lambda x: first_line[x[1]])  # Python's sort is stable: file order inside a movie
    first = min(x[4] for x in ratings)
    split_of = {m: (-1 if m <= 23 else 0 if m <= 28 else 1) for m in range(14, 34)}  # flag: -1/0/1
    kept = [(u, i, r, t, split_of[m - first]) for u, i, r, t, m in ratings if m - first in split_of]
    if not kept:
        d = datetime.fromtimestamp(min(x[3] for x in ratings), tz=timezone.utc)
        raise UsageError(f"{raw_dir}/ratings.dat: no rating falls in months 14-33 counted from the first rating's "
                         f"month ({d:%Y-%m}); MovieLens-1M has them (2001-06 to 2003-01)")
    # train rows, then valid, then test (each in join order), then ONE stable sort by (user, time)
    kept = [x for flag in (-1, 0, 1) for x in kept if x[4] == flag]
    kept.sort(key=lambda x: (x[0], x[3]))
    user_id = {u: k + 1 for k, u in enumerate(sorted({x[0] for x in kept}))}
    item_id = {}
    for x in kept:
        item_id.setdefault(x[1], len(item_id) + 1)
    title = {item_id[i]: titles[i] for i in item_id}
    _write_authors_split([user_id[x[0]] for x in kept], [item_id[x[1]] for x in kept], [int(x[2] >= 4) for x in kept],
                         [x[3] for x in kept], [x[4] for x in kept], title, out_dir, small_frac=0.5,
                         where=os.path.join(raw_dir, "ratings.dat"))


# ---------------------------------------------------------------------------------------------
# Raw Amazon-Book (Amazon Review Data 2018), as the authors' notebook
# dataset/amazon_book/processing_ood.ipynb did it. The reviews file holds 27 million lines (10 GB
# unpacked): it is read one line at a time, and only 2017's reviews (about 4 million) are kept, as
# compact arrays, never as parsed objects.

AMAZON_MIN_RATINGS = 20                      # keep users and books with MORE than this many 2017 ratings
YEAR_2017 = (1483228800, 1514764800)         # [2017-01-01, 2018-01-01) in unix seconds, UTC
DECEMBER_2017 = 1512086400                   # 2017-12-01: train is January-November
REVIEW_FIELDS = ("asin", "reviewerID", "overall", "unixReviewTime")


def _json_lines(path):
    """Yield (line number, object) from a gzip file of JSON lines, one line at a time."""
    import gzip
    import json
    import zlib
    try:
        with gzip.open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise UsageError(f"{path}: line {n}: not JSON: {line[:60].decode('utf-8', 'replace')!r}")
                if not isinstance(obj, dict):
                    raise UsageError(f"{path}: line {n}: a JSON {type(obj).__name__}, expected an object")
                yield n, obj
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found")
    except (OSError, EOFError, zlib.error) as e:  # not gzip, or cut short: a broken download
        raise UsageError(f"{path}: not a complete gzip file ({type(e).__name__}: {e}); download it again")


def _first_appearance_ids(codes):
    """codes in listing order -> ids 1..K numbered by first appearance (the notebook's `.unique()` map)."""
    uniq, first = np.unique(codes, return_index=True)
    ids = np.zeros(int(codes.max()) + 1, np.int64)
    ids[uniq[np.argsort(first)]] = np.arange(1, len(uniq) + 1)
    return ids[codes]


def _read_2017_reviews(reviews_path):
    """Pass 1 over the reviews: every line is checked; 2017's are kept as integer codes.
    -> ({asin: code}, {reviewerID: code}, (asin code, user code, stars, unix time) arrays, one per kept review)."""
    from array import array
    asin_code, user_code = {}, {}
    asin, user, stars, ts = array("q"), array("q"), array("f"), array("q")
    for n, r in _json_lines(reviews_path):
        missing = [k for k in REVIEW_FIELDS if r.get(k) is None]
        if missing:
            raise UsageError(f"{reviews_path}: line {n}: review has no {', '.join(map(repr, missing))}")
        t, o = r["unixReviewTime"], r["overall"]
        if not isinstance(t, (int, float)) or not isinstance(o, (int, float)):
            raise UsageError(f"{reviews_path}: line {n}: unixReviewTime {t!r} and overall {o!r} must be numbers")
        if not YEAR_2017[0] <= t < YEAR_2017[1]:
            continue
        asin.append(asin_code.setdefault(r["asin"], len(asin_code)))
        user.append(user_code.setdefault(r["reviewerID"], len(user_code)))
        stars.append(o)
        ts.append(int(t))
    columns = (np.frombuffer(asin, np.int64), np.frombuffer(user, np.int64), np.frombuffer(stars, np.float32),
               np.frombuffer(ts, np.int64))
    return asin_code, user_code, columns


def _read_titles(meta_path, asin_code):
    """Pass 2, the metadata, for the books reviewed in 2017 only -> (the line of each one's last
    occurrence (its place in the right join; -1 = no metadata), the title on that line)."""
    meta_line = np.full(len(asin_code), -1, np.int64)
    titles = [""] * len(asin_code)
    for n, m in _json_lines(meta_path):
        if m.get("asin") is None:
            raise UsageError(f"{meta_path}: line {n}: metadata has no 'asin'")
        code = asin_code.get(m["asin"])
        if code is None:
            continue
        t = m.get("title")
        t = "" if t is None else str(t)  # the notebook's fillna('')
        if "getTime" in t:  # the notebook drops these unformatted lines before deduplicating
            continue
        meta_line[code], titles[code] = n, t  # a later line replaces an earlier one: keep='last'
    return meta_line, titles


def build_amazon_book_split(raw_dir, out_dir):
    """Books_5.json.gz + meta_Books.json.gz -> {train,valid,test,valid_small}_ood2.pkl, the authors' rules:

    reviews (asin, reviewerID, overall, unixReviewTime) right-joined to the metadata's titles (metadata
    without 'getTime' titles, deduplicated on asin keeping the LAST line, a missing title read as '' and
    the book kept: its prompts quote an empty title, as the notebook's do; `--stats` counts them),
    so rows come grouped by book in metadata order, file order inside a book, and reviews of books
    without metadata are dropped; keep 2017 (UTC); keep users and books with more than 20 ratings in
    2017, counted once on the joined 2017 rows (not repeated until nothing changes); label = 1 for 5
    stars only; users and books numbered 1.. by first appearance in that order; train = January to
    November; December sorted by time and cut in half: first half valid, second half test; then
    histories and not_cold as for ML-1M; valid_small = valid.sample(frac=0.25, random_state=2023).

    One change: the notebook sorted December with numpy's default quicksort, which does not keep the
    order of reviews in the same second; we sort stably (join order kept), so a rebuild is repeatable."""
    reviews_path, meta_path = (os.path.join(raw_dir, f) for f in RAW["amazon-book"][0])
    asin_code, user_code, (asin, user, stars, ts) = _read_2017_reviews(reviews_path)
    meta_line, titles = _read_titles(meta_path, asin_code)
    # The right join: drop reviews of books without metadata; order by metadata line, stable.
    rows = np.flatnonzero(meta_line[asin] >= 0)
    rows = rows[np.argsort(meta_line[asin[rows]], kind="stable")]
    # More than 20 ratings in 2017, users and books, counted once on the joined rows.
    u_count = np.bincount(user[rows], minlength=len(user_code))
    i_count = np.bincount(asin[rows], minlength=len(asin_code))
    rows = rows[(u_count[user[rows]] > AMAZON_MIN_RATINGS) & (i_count[asin[rows]] > AMAZON_MIN_RATINGS)]
    if len(rows) == 0:
        raise UsageError(f"{reviews_path}: no 2017 reviews by users and of books with more than "
                         f"{AMAZON_MIN_RATINGS} of them: these are not the Amazon Review Data 2018 Books files")
    uid, iid = _first_appearance_ids(user[rows]), _first_appearance_ids(asin[rows])
    title = [""] * (int(iid.max()) + 1)
    for i, a in zip(iid.tolist(), asin[rows].tolist()):
        title[i] = titles[a]
    t, label = ts[rows], (stars[rows] >= 5).astype(np.int64)
    # Train = January-November in join order; December by time (stable), first half valid.
    train = np.flatnonzero(t < DECEMBER_2017)
    december = np.flatnonzero(t >= DECEMBER_2017)
    december = december[np.argsort(t[december], kind="stable")]
    half = len(december) // 2
    order = np.concatenate([train, december[:half], december[half:]])
    flag = np.concatenate([np.full(len(train), -1), np.zeros(half, np.int64), np.ones(len(december) - half, np.int64)])
    listing = np.lexsort((t[order], uid[order]))  # stable: by user, then time
    order, flag = order[listing], flag[listing]
    _write_authors_split(uid[order].tolist(), iid[order].tolist(), label[order].tolist(), t[order].tolist(),
                         flag.tolist(), title, out_dir, small_frac=0.25, where=reviews_path)


# Datasets that can be built from raw files: (raw file names, builder, download when all are absent)
RAW = {"ml-1m": (("ratings.dat", "movies.dat"), build_ml1m_split, _download_ml1m),
       "amazon-book": (("Books_5.json.gz", "meta_Books.json.gz"), build_amazon_book_split, _download_amazon)}


# ---------------------------------------------------------------------------------------------
# Prompts: the paper's Yes/No question, worded as the reference's prompt files. Templates live in prompts/{movie,book}_{text,collm}.txt.
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
    shared: np.ndarray   # (N,) tokens before the target item's title: they depend on the user alone

    @property
    def lengths(self):
        return np.diff(self.offsets)


def encode_split(data, split, seg_tok, template):
    """Tokenise every prompt of a split once (about two seconds on ML-1M train with a fast tokenizer).

    Each row also records how many of its first tokens do not depend on the target item: where the
    same prompt asked about two made-up titles ("A", "B") stops agreeing. That depends on the history
    alone, so every row of one history gets the same number, and scoring computes those tokens once
    for all of them (collm.CoLLM.decode_after_prefix)."""
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


def eval_batches(lengths, batch_size, shared=None, groups=None):
    """Every row exactly once, longest first (a memory problem shows at once). In length order; or,
    given each row's shared-prefix length and prefix group (prefix_groups), longest prefix first
    with each group's rows side by side, so that a batch holds whole groups and the model computes
    each group's prefix once (collm.CoLLM.decode_after_prefix)."""
    order = np.argsort(-lengths, kind="stable") if groups is None else np.lexsort((-lengths, groups, -shared))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def prefix_groups(enc, rows):
    """-> (len(rows),) group ids: rows with the same tokens before their target item's title (one
    user with one history, asked about several items) get the same id."""
    ids = {}
    starts = enc.offsets[rows]
    return np.array([ids.setdefault(enc.tokens[start:start + n].tobytes(), len(ids))
                     for start, n in zip(starts, enc.shared[rows])])


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
                 shared=torch.from_numpy(enc.shared[rows]),
                 uid=torch.from_numpy(split.uid[rows]), iid=torch.from_numpy(split.iid[rows]),
                 label=torch.from_numpy(split.label[rows]))
    if his_len:
        batch["his"] = torch.from_numpy(padded_history(split, his_len, rows))
    return batch


# ---------------------------------------------------------------------------------------------
# CLI


def items_in_data(data):
    """-> (item_num,) bool, True for the ids that occur in the data, as a target or in a history (a
    title cannot tell: an Amazon book may have an empty one)."""
    seen = np.zeros(data.item_num, bool)
    for sp in data.splits.values():
        seen[sp.iid] = True
        seen[sp.his_items] = True
    return seen


def untitled_items(data):
    """-> ids of the items in the data whose title is ''. The Amazon-Book notebook keeps books whose
    metadata has no title (its fillna('')), and so do we: their prompts quote an empty title. Worth
    knowing before training on them, so --stats says how many."""
    return [i for i in np.flatnonzero(items_in_data(data)).tolist() if data.titles[i] == ""]


def print_stats(data):
    print(f"{data.name}: users {data.user_num - 1} (table {data.user_num}), items {data.item_num - 1} "
          f"(table {data.item_num}), domain {data.domain}")
    print(f"{'split':<12}{'rows':>8}{'pos rate':>10}{'cold':>8}{'warm':>8}{'his min':>9}{'his mean':>10}{'his max':>9}")
    for s, sp in data.splits.items():
        h = np.diff(sp.his_ptr)
        print(f"{s:<12}{len(sp):>8,}{sp.label.mean():>10.3f}{1 - sp.not_cold.mean():>8.3f}{sp.warm.mean():>8.3f}"
              f"{h.min():>9}{h.mean():>10.1f}{h.max():>9}")
    print(f"source: {data.source}")
    untitled = untitled_items(data)
    if untitled:
        print(f"warning: {len(untitled)} items have no title (kept as the authors' notebook keeps them: their prompts "
              f"quote an empty title \"\"), e.g. item {', '.join(map(str, untitled[:3]))}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Inspect a CoLLM dataset: split statistics or one row's prompt.")
    add_data_flags(p)
    p.add_argument("--stats", action="store_true", help="print split sizes, positive rates, cold/warm shares, history lengths")
    p.add_argument("--split", default="test", choices=SPLITS, help="split for --show (default test)")
    p.add_argument("--show", type=int, default=None, metavar="ROW", help="print the prompt of this row of --split")
    p.add_argument("--prompt", default="text", choices=("text", "collm"), help="text-only (stage 1) or CoLLM (stage 2) prompt")
    p.add_argument("--template", default=None, help="a template file to use instead of prompts/<domain>_<prompt>.txt")
    args = p.parse_args(argv)
    if args.stats is False and args.show is None:
        raise UsageError("nothing to do: give --stats and/or --show ROW")
    data = load_dataset(args.data, args.data_root)
    if args.stats:
        print_stats(data)
    if args.show is not None:
        template = load_template(data.domain, args.prompt, args.template)
        sp = data.splits[args.split]
        if not 0 <= args.show < len(sp):
            raise UsageError(f"--show {args.show}: {args.split} has rows 0..{len(sp) - 1}")
        hist = [data.titles[i] for i in sp.history(args.show)]
        print(render_prompt(prompt_segments(template, hist, data.titles[sp.iid[args.show]])))


if __name__ == "__main__":
    cli_main(main)
