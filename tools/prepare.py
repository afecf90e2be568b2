"""tools/prepare.py: raw files -> the authors' four split pickles (paper section 4.1), as nanoGPT's
data/*/prepare.py: building a dataset from raw files by the authors' rules, downloading what is missing.

The one tool that touches the network or builds a dataset. data.py reads what it leaves: the released
pickles (or their zip) in the data root, or this tool's build of the raw files, kept in the cache
(data.built_folder).

    python tools/prepare.py --data ml-1m          # find, build or download the split; say where it came from
    python tools/prepare.py --data amazon-book    # the paper's second dataset (a 3 GB download, a long build)
    python tools/prepare.py --data ml-1m --stats  # ... and its split sizes, positive rates, cold shares
    python tools/prepare.py --data ml-1m --show 5 --prompt collm   # test row 5's prompt text

With neither pickles nor raw files, it downloads: for ml-1m the authors' ml-1m.zip (the exact split)
into `<root>/`, else the GroupLens files; for amazon-book the two raw files. A download never replaces
a file that is already there. The builders follow the authors' notebooks dataset/*/processing_ood.ipynb:
  ml-1m:        GroupLens `ratings.dat` + `movies.dat`                     (build_ml1m_split)
  amazon-book:  Amazon 2018 `Books_5.json.gz` + `meta_Books.json.gz`       (build_amazon_book_split)
"""
import argparse
import os
import sys
import tempfile
import zipfile
from datetime import datetime, timezone

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the chapters, one folder up
import data  # noqa: E402
from data import RAW_FILES, UsageError, write_atomic  # noqa: E402

# Downloads, tried only when a dataset has neither pickles nor raw files (see prepare)
# Downloads, tried only when a dataset has neither pickles nor raw files (see find_split_files)
AUTHORS_ZIP_URL = "https://github.com/zyang1580/CoLLM/raw/HEAD/collm-datasets/ml-1m.zip"  # the exact split

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"

AMAZON_URLS = {  # Amazon Review Data 2018, "5-core" Books reviews and Books metadata
    "Books_5.json.gz": "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_v2/categoryFilesSmall/Books_5.json.gz",
    "meta_Books.json.gz": "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_v2/metaFiles2/meta_Books.json.gz"}


# ---------------------------------------------------------------------------------------------
# Finding a split, else building it from the raw files (once, into the cache), else downloading


def prepare(name, root):
    """-> ({split: (opener, printable path)}, where it came from): what data.py finds, else a build of
    the raw files in `<root>/<name>/`, else a download (then a build, for raw downloads)."""
    try:
        return data.find_split_files(name, root)
    except UsageError:
        if name not in RAW:
            raise
    folder = name if os.path.isdir(name) else os.path.join(root, name)
    zpath = folder + ".zip"
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
    return data.find_split_files(name, root)[0], f"built by {build.__name__} from {' + '.join(raw)} (cached in {out})"


def _cached_build(name, raw, build):
    """Run `build(raw folder, out folder)` once per version of the raw files; return the out folder.
    The build writes into a temporary folder renamed into place at the end, so a failed or
    interrupted build leaves nothing that a later run could mistake for a split."""
    out = data.built_folder(name, raw)
    if data._pickles_in(out):
        return out

    def build_into(tmp):
        try:
            os.makedirs(tmp)
        except OSError as e:
            raise UsageError(f"cannot create {tmp} to build --data {name} into ({e.strerror}); "
                             f"set $COLLM_CACHE to a writable folder")
        build(os.path.dirname(raw[0]), tmp)
        with open(os.path.join(tmp, "raw_files.txt"), "w") as f:  # for a human wondering what this is
            f.write("".join(f"{p}\t{os.stat(p).st_size} bytes\tmtime_ns {os.stat(p).st_mtime_ns}\n" for p in raw))

    try:
        write_atomic(out, build_into)
    except OSError:  # the rename failed: another run finished the same build first, so use its copy
        if not os.path.isdir(out):  # no: a real error of the build itself
            raise
        if not data._pickles_in(out):
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
        found = data._pickles_in_zip(zpath, "ml-1m")
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
                contents = {n: zf.read(f"ml-1m/{n}") for n in RAW_FILES["ml-1m"]}
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
RAW = {"ml-1m": (RAW_FILES["ml-1m"], build_ml1m_split, _download_ml1m),
       "amazon-book": (RAW_FILES["amazon-book"], build_amazon_book_split, _download_amazon)}


# ---------------------------------------------------------------------------------------------
# Looking at a split: its sizes and shares (--stats), one row's prompt (--show)


def untitled_items(ds):
    """-> ids of the items in the data whose title is ''. The Amazon-Book notebook keeps books whose
    metadata has no title (its fillna('')), and so do we: their prompts quote an empty title. Worth
    knowing before training on them, so --stats says how many."""
    return [i for i in np.flatnonzero(data.items_in_data(ds)).tolist() if ds.titles[i] == ""]


def print_stats(ds):
    """--stats: per split, its rows, positive rate, cold and warm shares and history lengths."""
    print(f"{ds.name}: users {ds.user_num - 1} (table {ds.user_num}), items {ds.item_num - 1} "
          f"(table {ds.item_num}), domain {ds.domain}")
    print(f"{'split':<12}{'rows':>8}{'pos rate':>10}{'cold':>8}{'warm':>8}{'his min':>9}{'his mean':>10}{'his max':>9}")
    for s, sp in ds.splits.items():
        h = np.diff(sp.his_ptr)
        print(f"{s:<12}{len(sp):>8,}{sp.label.mean():>10.3f}{1 - sp.not_cold.mean():>8.3f}{sp.warm.mean():>8.3f}"
              f"{h.min():>9}{h.mean():>10.1f}{h.max():>9}")
    print(f"source: {ds.source}")
    untitled = untitled_items(ds)
    if untitled:
        print(f"warning: {len(untitled)} items have no title (kept as the authors' notebook keeps them: their prompts "
              f"quote an empty title \"\"), e.g. item {', '.join(map(str, untitled[:3]))}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Find, build or download a CoLLM dataset's split and say where it came "
                                            "from; --stats and --show look at it.")
    data.add_data_flags(p)
    p.add_argument("--stats", action="store_true", help="print split sizes, positive rates, cold/warm shares, "
                   "history lengths")
    p.add_argument("--show", type=int, default=None, metavar="ROW", help="print the prompt of this row of --split")
    p.add_argument("--split", default="test", choices=data.SPLITS, help="split for --show (default test)")
    p.add_argument("--prompt", default="text", choices=("text", "collm"),
                   help="--show: the text-only (stage 1) or the CoLLM (stage 2) prompt")
    p.add_argument("--template", default=None, help="--show: a template file instead of prompts/<domain>_<prompt>.txt")
    args = p.parse_args(argv)
    _, source = prepare(args.data, data.data_root(args.data_root))
    print(f"--data {args.data}: {source}")
    if args.stats or args.show is not None:
        ds = data.load_dataset(args.data, args.data_root)
    if args.stats:
        print_stats(ds)
    if args.show is not None:
        template = data.load_template(ds.domain, args.prompt, args.template)
        sp = ds.splits[args.split]
        if not 0 <= args.show < len(sp):
            raise UsageError(f"--show {args.show}: {args.split} has rows 0..{len(sp) - 1}")
        hist = [ds.titles[i] for i in sp.history(args.show)]
        print(data.render_prompt(data.prompt_segments(template, hist, ds.titles[sp.iid[args.show]])))


if __name__ == "__main__":
    data.cli_main(main)
