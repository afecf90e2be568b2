"""Tests for data.py: building the split from raw ML-1M, loading the authors' pickles, prompts,
tokenisation, batching, and the one-line errors for bad input.

Everything runs offline on CPU. Tests that need the released split or the real tokenizers skip
when ../shared does not have them (see conftest.py)."""
import io
import os
import time
import zipfile
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

import data
from tools import prepare
from conftest import (TEST, TINY_TITLES, TRAIN, VALID, assert_error_line, frame, run_python, shared_tokenizer,
                      write_dataset)

AUTHORS_COLUMNS = ["uid", "iid", "label", "timestamp", "his", "his_title", "title", "flag", "not_cold"]


def prepared(name, root):
    """tools/prepare.py's build (or download) of a dataset, then data.py's load of it: the user's two steps."""
    prepare.prepare(name, str(root))
    return data.load_dataset(name, root)


def prepare_cli(*args):
    """`python tools/prepare.py ARGS` -> (exit code, stderr), for assert_error_line."""
    res = run_python("tools/prepare.py", *args, timeout=60)
    return res.returncode, res.stderr


def data_cli(*args, root=None):
    """`python tools/prepare.py ARGS` (its --stats and --show look at a split) with $COLLM_DATA = root (unset
    when None) -> (exit code, stderr), for assert_error_line."""
    res = run_python("tools/prepare.py", *args, env={"COLLM_DATA": root}, timeout=60)
    return res.returncode, res.stderr


# ---------------------------------------------------------------------------------------------
# Raw ML-1M -> the authors' four pickles (their notebook dataset/ml-1m/processing_ood.ipynb)


def ts(*when):
    """Unix seconds of a UTC date: the month rules are read in UTC."""
    return int(datetime(*when, tzinfo=timezone.utc).timestamp())


MOVIES = {1: "Toy Story (1995)", 2: "Jumanji (1995)", 6: "Heat (1995)", 47: "Seven (Se7en) (1995)",
          608: "Fargo (1996)", 2324: "Life Is Beautiful (La Vita è bella) (1997)", 3000: "Never Rated (2000)"}
# (raw user, raw movie, stars, time) in file order; relative month = months since 2000-04 (row 0)
RATINGS = [
    (9, 1, 5, ts(2000, 4, 20)),                 # 0  month 0 sets the minimum; the row is dropped
    (30, 1, 5, ts(2001, 5, 31, 23, 59, 59)),    # 1  month 13: dropped, so never in a history
    (30, 6, 4, ts(2001, 6, 1)),                 # 2  month 14: first train month
    (30, 2, 2, ts(2001, 7, 1)),                 # 3  a train negative: never enters a history
    (30, 608, 3, ts(2002, 3, 31, 23, 59, 59)),  # 4  month 23: last train month; 3 stars -> label 0
    (30, 2324, 5, ts(2002, 4, 1)),              # 5  month 24: first valid month; movie not in train
    (30, 47, 4, ts(2002, 8, 20)),               # 6  month 28: last valid month
    (30, 1, 1, ts(2002, 9, 1)),                 # 7  month 29: first test month
    (30, 2, 5, ts(2003, 1, 31)),                # 8  month 33: last test month
    (30, 608, 5, ts(2003, 2, 1)),               # 9  month 34: dropped
    (12, 6, 5, ts(2002, 12, 1)),                # 10 a user with test rows only
    (4, 47, 5, ts(2001, 10, 10)),               # 11 two rows in the same second come out in the order of
    (4, 2, 4, ts(2001, 10, 10)),                # 12 their movies' first lines (2: row 3, 47: row 6): 12, 11
    (4, 1, 3, ts(2002, 5, 5)),                  # 13 this movie is never rated in train -> cold
    (4, 608, 4, ts(2002, 6, 6)),                # 14
    (4, 6, 4, ts(2002, 10, 5)),                 # 15
]
USER_ID = {4: 1, 12: 2, 30: 3}  # ascending raw id; user 9 only has dropped rows and gets none
ITEM_ID = {2: 1, 47: 2, 1: 3, 608: 4, 6: 5, 2324: 6}  # first appearance in the (user, time) listing
# per split, in listing order: (RATINGS row, label, history item ids, not_cold)
EXPECTED = {
    "train": [(12, 1, [], 1), (11, 1, [1], 1), (2, 1, [], 1), (3, 0, [5], 1), (4, 0, [5], 1)],
    "valid": [(13, 0, [1, 2], 0), (14, 1, [1, 2], 1), (5, 1, [5], 0), (6, 1, [5, 6], 1)],
    "test": [(15, 1, [1, 2, 4], 1), (10, 1, [], 0), (7, 0, [5, 6, 2], 0), (8, 1, [5, 6, 2], 1)],
}
TITLE = {ITEM_ID[m]: MOVIES[m] for m in ITEM_ID}


def write_raw(folder, ratings_text=None):
    """ratings.dat and movies.dat in the exact GroupLens format: `::`-separated, latin-1."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "movies.dat"), "wb") as f:
        f.write("".join(f"{i}::{t}::Drama|Comedy\n" for i, t in MOVIES.items()).encode("latin-1"))
    with open(os.path.join(folder, "ratings.dat"), "wb") as f:
        f.write((ratings_text or "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in RATINGS)).encode("latin-1"))
    return folder


def test_build_ml1m_split_follows_the_authors_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Tokyo")  # months are UTC months whatever the local time zone
    time.tzset()
    try:
        prepare.build_ml1m_split(write_raw(tmp_path / "raw"), tmp_path / "out")
    finally:
        monkeypatch.undo()
        time.tzset()
    frames = {s: pd.read_pickle(tmp_path / "out" / f"{s}_ood2.pkl") for s in data.SPLITS}
    for split, flag in (("train", -1.0), ("valid", 0.0), ("test", 1.0)):
        df, want = frames[split], EXPECTED[split]
        assert list(df.columns) == AUTHORS_COLUMNS
        assert df.dtypes[["uid", "iid", "label", "timestamp", "flag", "not_cold"]].astype(str).tolist() == \
            ["int64"] * 4 + ["float64", "int64"]
        raw = [RATINGS[k] for k, *_ in want]
        assert df.uid.tolist() == [USER_ID[u] for u, *_ in raw]
        assert df.iid.tolist() == [ITEM_ID[i] for _, i, *_ in raw]
        assert df.timestamp.tolist() == [t for *_, t in raw]
        assert df.label.tolist() == [label for _, label, _, _ in want]
        assert df.his.tolist() == [[0] + his for _, _, his, _ in want]
        assert df.his_title.tolist() == [[""] + [TITLE[i] for i in his] for _, _, his, _ in want]
        assert df.title.tolist() == [MOVIES[i] for _, i, *_ in raw]
        assert df.not_cold.tolist() == [nc for *_, nc in want]
        assert (df.flag == flag).all()
    assert frames["valid"].title.iloc[2] == "Life Is Beautiful (La Vita è bella) (1997)"  # latin-1 read
    pd.testing.assert_frame_equal(frames["valid_small"], frames["valid"].sample(frac=0.5, random_state=2023))


def test_load_dataset_builds_from_raw_files_then_loads(tmp_path):
    write_raw(tmp_path / "ml-1m")
    with pytest.raises(data.UsageError, match="python tools/prepare.py --data ml-1m builds it"):
        data.load_dataset("ml-1m", tmp_path)  # data.py builds nothing: it says which tool does
    d = prepared("ml-1m", tmp_path)
    assert sorted(os.listdir(tmp_path / "ml-1m")) == ["movies.dat", "ratings.dat"]  # nothing written beside them
    assert "built by tools/prepare.py" in d.source and data.cache_dir() in d.source
    assert (d.name, d.domain, d.user_num, d.item_num) == ("ml-1m", "movie", 4, 7)
    assert d.titles == [""] + [TITLE[i] for i in range(1, 7)]
    test = d.splits["test"]
    assert test.uid.tolist() == [1, 2, 3, 3] and test.iid.tolist() == [5, 5, 3, 1]
    assert test.label.dtype == np.float32 and test.label.tolist() == [1, 1, 0, 1]
    assert [test.history(r).tolist() for r in range(4)] == [[1, 2, 4], [], [5, 6, 2], [5, 6, 2]]
    assert test.not_cold.tolist() == [True, False, False, True]
    assert not test.warm.any()  # warm needs more than 3 train rows; user 3 has exactly 3


def test_no_raw_files_and_no_network_says_where_to_put_what(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "GROUPLENS_URL", "http://127.0.0.1:9/x.zip")  # nothing listens on port 9
    monkeypatch.setattr(prepare, "AUTHORS_ZIP_URL", "http://127.0.0.1:9/y.zip")
    with pytest.raises(data.UsageError) as e:
        prepared("ml-1m", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "download failed" in msg
    assert str(tmp_path / "ml-1m.zip") in msg
    assert "ratings.dat + movies.dat" in msg and str(tmp_path / "ml-1m") in msg


def test_malformed_ratings_line_names_the_file_and_line(tmp_path):
    good = "1::1::5::978300760\n"
    write_raw(tmp_path / "a", ratings_text=good + "1::6::5\n")
    with pytest.raises(data.UsageError, match=r"ratings\.dat: line 2: 3 '::'-separated fields, expected 4"):
        prepare.build_ml1m_split(tmp_path / "a", tmp_path / "a")
    write_raw(tmp_path / "b", ratings_text=good + "\n1::x::5::978300760\n")  # line numbers count blank lines
    with pytest.raises(data.UsageError, match=r"ratings\.dat: line 3: expected four integers"):
        prepare.build_ml1m_split(tmp_path / "b", tmp_path / "b")
    write_raw(tmp_path / "ml-1m", ratings_text=good + "1::6::5\n")
    assert_error_line(*prepare_cli("--data", "ml-1m", "--data-root", tmp_path), "ratings.dat: line 2")


def test_no_rating_in_the_window_is_one_error_line(tmp_path):
    early = "".join(f"1::{i}::5::{ts(2000, 4, 20 + i)}\n" for i in (1, 2))  # months 0 only: nothing to keep
    write_raw(tmp_path / "ml-1m", ratings_text=early)
    with pytest.raises(data.UsageError, match=r"ratings\.dat: no rating falls in months 14-33 .*\(2000-04\)"):
        prepare.build_ml1m_split(tmp_path / "ml-1m", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert_error_line(*prepare_cli("--data", "ml-1m", "--data-root", tmp_path), "ratings.dat", "months 14-33")
    assert os.listdir(data.cache_dir()) == []  # the failed build left nothing in the cache
    train_only = "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in RATINGS[:5])
    write_raw(tmp_path / "ml-1m", ratings_text=train_only)
    with pytest.raises(data.UsageError, match=r"ratings\.dat: the authors' rules leave no valid and no test rows"):
        prepared("ml-1m", tmp_path)
    assert os.listdir(data.cache_dir()) == []


def test_one_raw_file_missing_names_it_and_downloads_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "_fetch", lambda *a: pytest.fail("no download when the user's folder has files"))
    write_raw(tmp_path / "ml-1m")
    os.remove(tmp_path / "ml-1m" / "movies.dat")
    with pytest.raises(data.UsageError, match=r"holds ratings\.dat but no movies\.dat; put movies\.dat there too"):
        prepared("ml-1m", tmp_path)
    assert os.listdir(tmp_path / "ml-1m") == ["ratings.dat"]


def test_downloads_try_the_authors_zip_first_and_never_overwrite(tmp_path, monkeypatch):
    fetched = []

    def fake_fetch(url, f, desc):  # the authors' zip is unreachable; GroupLens serves its zip
        fetched.append(url)
        if url == prepare.AUTHORS_ZIP_URL:
            raise OSError("unreachable")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for n in ("ratings.dat", "movies.dat"):
                zf.writestr(f"ml-1m/{n}", (write_raw(tmp_path / "src") / n).read_bytes())
        f.write(buf.getvalue())
    monkeypatch.setattr(prepare, "_fetch", fake_fetch)
    d = prepared("ml-1m", tmp_path / "root")
    assert fetched == [prepare.AUTHORS_ZIP_URL, prepare.GROUPLENS_URL]
    assert sorted(os.listdir(tmp_path / "root")) == ["ml-1m"]  # no zip, no temporary file left behind
    assert len(d.splits["test"]) == 4 and "built by tools/prepare.py" in d.source

    # when the authors' zip comes, it is the split, read in place; a file already at the target stays
    (tmp_path / "rel" / "ml-1m").mkdir(parents=True)
    frames = {s: pd.read_pickle(p) for s, p in _rebuilt(tmp_path).items()}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for s, df in frames.items():
            zf.writestr(f"ml-1m/{s}_ood2.pkl", _pickle_bytes(df))
    monkeypatch.setattr(prepare, "_fetch", lambda url, f, desc: f.write(buf.getvalue()))
    _, source = prepare.prepare("ml-1m", str(tmp_path / "rel"))
    assert source.startswith("the four pickles in " + str(tmp_path / "rel" / "ml-1m.zip")) and "downloaded" in source
    d = data.load_dataset("ml-1m", tmp_path / "rel")  # the zip, read in place from now on
    assert d.source == "the four pickles in " + str(tmp_path / "rel" / "ml-1m.zip")
    target = tmp_path / "busy.zip"
    target.write_bytes(b"the user's own file")
    with pytest.raises(FileExistsError):
        prepare._download(prepare.AUTHORS_ZIP_URL, str(target))
    assert target.read_bytes() == b"the user's own file" and os.listdir(tmp_path).count("busy.zip") == 1
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".download-")]


def _pickle_bytes(df):
    buf = io.BytesIO()
    df.to_pickle(buf)
    return buf.getvalue()


def _rebuilt(tmp_path):
    out = tmp_path / "built"
    if not out.exists():
        prepare.build_ml1m_split(write_raw(tmp_path / "src"), out)
    return {s: out / f"{s}_ood2.pkl" for s in data.SPLITS}


def test_cache_follows_the_raw_files_and_a_read_only_folder_works(tmp_path, monkeypatch):
    raw = write_raw(tmp_path / "ml-1m")
    first = prepared("ml-1m", tmp_path)
    assert prepared("ml-1m", tmp_path).source == first.source  # built once, then read
    # change ratings.dat: drop the last row (user 4's test row); the cache key changes, the split follows
    text = "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in RATINGS[:-1])
    write_raw(raw, ratings_text=text)
    second = prepared("ml-1m", tmp_path)
    assert second.source != first.source and len(second.splits["test"]) == len(first.splits["test"]) - 1
    assert len(os.listdir(data.cache_dir())) == 2
    # a read-only data folder (as root, chmod does not stop writes: the listing below is the check)
    os.chmod(raw, 0o555)
    os.chmod(tmp_path, 0o555)
    try:
        monkeypatch.setenv("COLLM_CACHE", os.path.join(data.cache_dir(), "elsewhere"))
        assert len(prepared("ml-1m", tmp_path).splits["test"]) == len(second.splits["test"])
    finally:
        os.chmod(tmp_path, 0o755)
        os.chmod(raw, 0o755)
    assert sorted(os.listdir(raw)) == ["movies.dat", "ratings.dat"]


def release_as_raw(frames, folder, seed=0):
    """GroupLens-format ratings.dat + movies.dat from which the authors' rules give back the release.

    The release fixes everything but what its rows do not show: raw ids (users get any increasing
    raw id, movies a shuffled one), star counts (4-5 for a positive, 1-3 for a negative), ratings
    outside the 14-33 month window (none, apart from one April-2000 line that sets month 0) and the
    order of lines. The only constraint on the order: rows of one user in one second come out in
    the order of their movies' first lines, so movies must first appear in an order consistent with
    every such group of the release (a topological order, ties broken at random); every other line
    goes anywhere after its movie's first line."""
    import heapq
    rng = np.random.default_rng(seed)
    listing = pd.concat([frames[s] for s in ("train", "valid", "test")]).sort_index()
    assert (listing.index == np.arange(len(listing))).all()  # the release's index is the listing position
    movies = np.unique(listing.iid)
    raw_movie = dict(zip(movies.tolist(), (rng.permutation(len(movies)) + 100).tolist()))
    after, blockers = {}, {i: 0 for i in movies.tolist()}
    for items in listing.groupby(["uid", "timestamp"], sort=False).iid.agg(list):
        for a, b in zip(items, items[1:]):
            if b not in after.setdefault(a, set()):
                after[a].add(b)
                blockers[b] += 1
    ready = [(rng.random(), i) for i, n in blockers.items() if n == 0]
    heapq.heapify(ready)
    rank = {}
    while ready:
        _, a = heapq.heappop(ready)
        rank[a] = len(rank)
        for b in after.get(a, ()):
            blockers[b] -= 1
            if blockers[b] == 0:
                heapq.heappush(ready, (rng.random(), b))
    assert len(rank) == len(movies), "the release's same-second rows admit no single movie order"
    stars = np.where(listing.label == 1, rng.integers(4, 6, len(listing)), rng.integers(1, 4, len(listing)))
    lines = [f"{u * 7 + 3}::{raw_movie[i]}::{r}::{t}\n" for u, i, r, t in
             zip(listing.uid.tolist(), listing.iid.tolist(), stars.tolist(), listing.timestamp.tolist())]
    # each movie's first line at its rank; every other line at a random place after it
    first = {}
    for k in rng.permutation(len(lines)).tolist():
        first.setdefault(listing.iid.iat[k], k)
    key = [rank[i] + (0 if first[i] == k else rng.uniform(0.001, len(movies) - rank[i]))
           for k, i in enumerate(listing.iid.tolist())]
    order = np.argsort(key, kind="stable")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "ratings.dat"), "wb") as f:
        f.write("".join(lines[k] for k in order).encode("latin-1"))
        f.write(f"999999::{raw_movie[movies[0]]}::3::{ts(2000, 4, 25)}\n".encode("latin-1"))  # month 0
        f.write(f"999999::7::3::{ts(2002, 1, 1)}\n".encode("latin-1"))  # a movie not in movies.dat
    titles = dict(zip(listing.iid.tolist(), listing.title.tolist()))
    with open(os.path.join(folder, "movies.dat"), "wb") as f:
        f.write("".join(f"{raw_movie[i]}::{titles[i]}::Drama\n" for i in rng.permutation(movies).tolist()).encode("latin-1"))
    return folder


def test_raw_files_made_from_the_release_rebuild_it_row_for_row(real_root, tmp_path):
    release = {s: data._read_pickle(*src) for s, src in data.find_split_files("ml-1m", real_root)[0].items()}
    prepare.build_ml1m_split(release_as_raw(release, tmp_path / "raw"), tmp_path / "out")
    for s in data.SPLITS:
        got, want = pd.read_pickle(tmp_path / "out" / f"{s}_ood2.pkl"), release[s]
        assert list(got.columns) == list(want.columns) and len(got) == len(want), s
        assert (got.index == want.index).all(), s  # valid_small: the same rows of valid
        for col in ("uid", "iid", "label", "timestamp", "title", "flag", "not_cold"):
            assert got[col].tolist() == want[col].tolist(), (s, col)
        for col in ("his", "his_title"):
            assert [list(h) for h in got[col]] == [list(h) for h in want[col]], (s, col)


# ---------------------------------------------------------------------------------------------
# The authors' pickles, on a tiny dataset written in their schema

@pytest.fixture
def tiny(tmp_path):
    return data.load_dataset(write_dataset(tmp_path), tmp_path)


def test_load_dataset_reads_the_authors_schema(tiny):
    assert (tiny.name, tiny.user_num, tiny.item_num) == ("tiny", 7, 7)
    assert tiny.titles == [""] + [TINY_TITLES[i] for i in range(1, 7)]
    test = tiny.splits["test"]
    assert [test.history(r).tolist() for r in range(len(test))] == [h for *_, h in TEST]
    assert test.warm.tolist() == [True, True, True, False, False, False, False, False]
    assert (~test.not_cold).tolist() == [False] * 5 + [True] * 3


# ---------------------------------------------------------------------------------------------
# The released ML-1M split (skips without ../shared/data)


def test_released_split_sizes_and_shares(ml1m):
    sizes = {s: len(sp) for s, sp in ml1m.splits.items()}
    assert sizes == {"train": 33891, "valid": 10401, "test": 7331, "valid_small": 5200}
    assert (ml1m.user_num, ml1m.item_num) == (839, 3256)
    for sp in ml1m.splits.values():
        assert abs(sp.label.mean() - 0.53) < 0.02
    train_users = set(ml1m.splits["train"].uid.tolist())
    for s, share in (("valid", 0.35), ("test", 0.42)):  # rows whose user is unseen in train
        assert abs(np.mean([u not in train_users for u in ml1m.splits[s].uid]) - share) < 0.01
    assert int(ml1m.splits["test"].warm.sum()) == 3522  # README, Results: 48% of test


def test_released_split_obeys_the_build_rules(real_root):
    """The authors' pickles are what build_ml1m_split's rules produce: histories, ids, months, sample."""
    frames = {s: data._read_pickle(*src) for s, src in data.find_split_files("ml-1m", real_root)[0].items()}
    for split, (first, last) in (("train", ("2001-06", "2002-03")), ("valid", ("2002-04", "2002-08")),
                                 ("test", ("2002-09", "2003-01"))):
        months = pd.to_datetime(frames[split].timestamp, unit="s").dt.strftime("%Y-%m")
        assert (months.min(), months.max()) == (first, last)
    listing = pd.concat([frames[s] for s in ("train", "valid", "test")]).sort_values(["uid", "timestamp"], kind="stable")
    liked, first_seen = {}, {}
    for u, i, label, his in zip(listing.uid, listing.iid, listing.label, listing.his):
        so_far = liked.setdefault(u, [0])
        assert list(his) == so_far
        if label == 1:
            so_far.append(i)
        first_seen.setdefault(i, len(first_seen) + 1)
    assert all(i == k for i, k in first_seen.items())  # items numbered by first appearance
    pd.testing.assert_frame_equal(frames["valid_small"], frames["valid"].sample(frac=0.5, random_state=2023))


def test_stats_cli_prints_row_counts(real_root):
    res = run_python("tools/prepare.py", "--data", "ml-1m", "--stats", env={"COLLM_DATA": real_root})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("--data ml-1m: the four pickles in ")  # where it was found, then the stats
    rows = {line.split()[0]: line.split()[1] for line in lines[3:7]}
    assert lines[7].startswith("source: the four pickles in ")
    assert rows == {"train": "33,891", "valid": "10,401", "test": "7,331", "valid_small": "5,200"}


def test_show_cli_prints_the_collm_prompt(ml1m, real_root):
    res = run_python("tools/prepare.py", "--data", "ml-1m", "--split", "test", "--show", 5, "--prompt", "collm",
                     env={"COLLM_DATA": real_root})
    assert res.returncode == 0, res.stderr
    sp = ml1m.splits["test"]
    segs = data.prompt_segments(data.load_template("movie", "collm"), [ml1m.titles[i] for i in sp.history(5)],
                                ml1m.titles[sp.iid[5]])
    assert res.stdout.split("\n", 1)[1] == data.render_prompt(segs) + "\n"  # after the line saying where from
    assert "<UserID>" in res.stdout and "<TargetItemID>" in res.stdout


# ---------------------------------------------------------------------------------------------
# Prompts (prompts/*.txt, the reference's wording) and their tokens. In the golden strings `\n` is two characters, backslash
# and n, as in the templates.

MANY = [f"Movie {k} ({1990 + k})" for k in range(1, 13)]  # 12 liked titles, oldest first
HISTORIES = {  # history length: (liked titles, target, the <ItemTitleList> text)
    0: ([], "Heat (1995)", "none"),  # data.EMPTY_HISTORY; the reference wrote the typo `unkow`
    3: (["Toy Story (1995)", "Godfather, The (1972)", "Fargo (1996)"], "Life Is Beautiful (La Vita è bella) (1997)",
        '"Toy Story (1995)", "Godfather, The (1972)", "Fargo (1996)"'),
    12: (MANY, "Heat (1995)",
         '"Movie 3 (1993)", "Movie 4 (1994)", "Movie 5 (1995)", "Movie 6 (1996)", "Movie 7 (1997)", '
         '"Movie 8 (1998)", "Movie 9 (1999)", "Movie 10 (2000)", "Movie 11 (2001)", "Movie 12 (2002)"'),
}
GOLDEN = {
    ("text", 0): r'''#Question: A user has given high ratings to the following movies: none. Leverage the information to predict whether the user would enjoy the movie titled "Heat (1995)"? Answer with "Yes" or "No". \n#Answer:''',
    ("text", 3): r'''#Question: A user has given high ratings to the following movies: "Toy Story (1995)", "Godfather, The (1972)", "Fargo (1996)". Leverage the information to predict whether the user would enjoy the movie titled "Life Is Beautiful (La Vita è bella) (1997)"? Answer with "Yes" or "No". \n#Answer:''',
    ("text", 12): r'''#Question: A user has given high ratings to the following movies: "Movie 3 (1993)", "Movie 4 (1994)", "Movie 5 (1995)", "Movie 6 (1996)", "Movie 7 (1997)", "Movie 8 (1998)", "Movie 9 (1999)", "Movie 10 (2000)", "Movie 11 (2001)", "Movie 12 (2002)". Leverage the information to predict whether the user would enjoy the movie titled "Heat (1995)"? Answer with "Yes" or "No". \n#Answer:''',
    ("collm", 0): r'''#Question: A user has given high ratings to the following movies: none. Additionally, we have information about the user's preferences encoded in the feature <UserID>. Using all available information, make a prediction about whether the user would enjoy the movie titled "Heat (1995)" with the feature <TargetItemID>? Answer with "Yes" or "No". \n#Answer:''',
    ("collm", 3): r'''#Question: A user has given high ratings to the following movies: "Toy Story (1995)", "Godfather, The (1972)", "Fargo (1996)". Additionally, we have information about the user's preferences encoded in the feature <UserID>. Using all available information, make a prediction about whether the user would enjoy the movie titled "Life Is Beautiful (La Vita è bella) (1997)" with the feature <TargetItemID>? Answer with "Yes" or "No". \n#Answer:''',
    ("collm", 12): r'''#Question: A user has given high ratings to the following movies: "Movie 3 (1993)", "Movie 4 (1994)", "Movie 5 (1995)", "Movie 6 (1996)", "Movie 7 (1997)", "Movie 8 (1998)", "Movie 9 (1999)", "Movie 10 (2000)", "Movie 11 (2001)", "Movie 12 (2002)". Additionally, we have information about the user's preferences encoded in the feature <UserID>. Using all available information, make a prediction about whether the user would enjoy the movie titled "Heat (1995)" with the feature <TargetItemID>? Answer with "Yes" or "No". \n#Answer:''',
}


@pytest.mark.parametrize("mode,n", sorted(GOLDEN))
def test_prompt_golden_strings(mode, n):
    history, target, title_list = HISTORIES[n]
    segs = data.prompt_segments(data.load_template("movie", mode), history, target)
    text = data.render_prompt(segs)
    assert text == GOLDEN[mode, n]
    assert text.endswith('"No". \\n#Answer:') and "\n" not in text  # backslash + n, never a newline
    assert f"movies: {title_list}." in text and f'titled "{target}"' in text
    assert segs.count(data.SLOT) == (2 if mode == "collm" else 0)


class CharTokenizer:
    """A stand-in tokenizer, one token per character and BOS = 1: enough for offsets, slots, padding."""
    bos_token_id, unk_token_id, eos_token_id, pad_token_id = 1, 0, 2, None

    def encode(self, text, add_special_tokens=True):
        return [1] * add_special_tokens + [ord(c) for c in text]


def sample_rows(ml1m, split="test"):
    """Every 25th row, plus rows with an empty history and with a non-ASCII target title."""
    sp = ml1m.splits[split]
    empty = np.flatnonzero(np.diff(sp.his_ptr) == 0)[:5]
    accents = [r for r in range(len(sp)) if not ml1m.titles[sp.iid[r]].isascii()][:5]
    assert len(empty) and len(accents)
    return sorted(set(range(0, len(sp), 25)) | set(empty.tolist()) | set(accents))


@pytest.mark.parametrize("name,bos,yes", [("llama", 1, 3869), ("qwen2", None, 9454)])
def test_segment_tokenizer_matches_whole_text_tokenisation(ml1m, name, bos, yes):
    tok = shared_tokenizer(name)
    seg_tok = data.SegmentTokenizer(tok)
    assert tok.encode("Yes", add_special_tokens=False) == [yes]
    assert seg_tok.prefix == ([bos] if bos else [])
    sp, text_t, collm_t = ml1m.splits["test"], data.load_template("movie", "text"), data.load_template("movie", "collm")
    for r in sample_rows(ml1m):
        hist, target = [ml1m.titles[i] for i in sp.history(r)], ml1m.titles[sp.iid[r]]
        segs = data.prompt_segments(text_t, hist, target)
        ids, slots = seg_tok(segs)
        assert ids == seg_tok.prefix + tok.encode(data.render_prompt(segs), add_special_tokens=False) and slots == []
        # CoLLM prompt: each slot holds the slot id; the pieces around the slots decode to the text
        segs = data.prompt_segments(collm_t, hist, target)
        ids, (u, i) = seg_tok(segs)
        assert ids[u] == ids[i] == seg_tok.slot_id and ids[:len(seg_tok.prefix)] == seg_tok.prefix
        pieces = [ids[len(seg_tok.prefix):u], ids[u + 1:i], ids[i + 1:]]
        text = data.render_prompt(segs).replace(" <TargetItemID>", " <UserID>").split(" <UserID>")
        assert [tok.decode(p) for p in pieces] == text


def test_encode_split_offsets_lengths_and_slots(tiny):
    seg_tok = data.SegmentTokenizer(CharTokenizer())
    for mode in ("text", "collm"):
        template = data.load_template("movie", mode)
        enc = data.encode_split(tiny, "test", seg_tok, template)
        sp = tiny.splits["test"]
        assert enc.offsets[0] == 0 and enc.offsets[-1] == len(enc.tokens)
        assert enc.slots.shape == (len(sp), 2 if mode == "collm" else 0)
        for r in range(len(sp)):
            row = enc.tokens[enc.offsets[r]:enc.offsets[r + 1]].tolist()
            segs = data.prompt_segments(template, [tiny.titles[i] for i in sp.history(r)], tiny.titles[sp.iid[r]])
            assert enc.lengths[r] == len(row) and (row, enc.slots[r].tolist()) == seg_tok(segs)
            assert all(row[s] == seg_tok.slot_id for s in enc.slots[r])
            if mode == "text":  # with one token per character the prompt text comes back
                assert "".join(map(chr, row[1:])) == data.render_prompt(segs)


# ---------------------------------------------------------------------------------------------
# Batches


def padding_share(lengths, batches):
    """Pad tokens / all tokens when each batch is padded to its longest row."""
    padded = sum(len(b) * lengths[b].max() for b in batches)
    return 1 - sum(lengths[b].sum() for b in batches) / padded


def assert_each_row_once(batches, n):
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(n))


def test_train_batches_cover_every_row_once_and_repeat_with_the_seed():
    lengths = np.random.default_rng(0).integers(160, 291, 5000)
    for bucket in (True, False):
        batches = data.train_batches(lengths, 16, np.random.default_rng(1), bucket=bucket)
        assert_each_row_once(batches, len(lengths))
        assert sorted(len(b) for b in batches)[1:] == [16] * (len(batches) - 1)  # one short batch at most
        again = data.train_batches(lengths, 16, np.random.default_rng(1), bucket=bucket)
        assert all(np.array_equal(a, b) for a, b in zip(batches, again))
        other = data.train_batches(lengths, 16, np.random.default_rng(2), bucket=bucket)
        assert not all(np.array_equal(a, b) for a, b in zip(batches, other))


def test_bucketing_keeps_padding_under_5_percent():
    lengths = np.random.default_rng(0).integers(160, 291, 20000)  # the ML-1M prompt length range
    bucketed = padding_share(lengths, data.train_batches(lengths, 16, np.random.default_rng(0)))
    shuffled = padding_share(lengths, data.train_batches(lengths, 16, np.random.default_rng(0), bucket=False))
    assert bucketed < 0.05 and shuffled > 3 * bucketed


def test_bucketing_on_real_prompt_lengths(ml1m):
    enc = data.encode_split(ml1m, "train", data.SegmentTokenizer(shared_tokenizer("llama")),
                            data.load_template("movie", "text"))
    lengths = enc.lengths
    bucketed = padding_share(lengths, data.train_batches(lengths, 16, np.random.default_rng(0)))
    shuffled = padding_share(lengths, data.train_batches(lengths, 16, np.random.default_rng(0), bucket=False))
    assert bucketed < 0.05 and shuffled > 3 * bucketed


def test_eval_batches_cover_every_row_once_longest_first():
    lengths = np.random.default_rng(0).integers(160, 291, 1001)
    batches = data.eval_batches(lengths, 32)
    assert_each_row_once(batches, len(lengths))
    assert np.all(np.diff(lengths[np.concatenate(batches)]) <= 0)


def test_collate_right_pads(tiny):
    enc = data.encode_split(tiny, "test", data.SegmentTokenizer(CharTokenizer()), data.load_template("movie", "collm"))
    rows, sp = np.array([6, 0, 7]), tiny.splits["test"]
    b = data.collate(enc, sp, rows, pad_id=-1)
    lens = enc.lengths[rows]
    assert b["input_ids"].shape == (3, lens.max())
    for k, r in enumerate(rows):
        assert b["input_ids"][k, :lens[k]].tolist() == enc.tokens[enc.offsets[r]:enc.offsets[r + 1]].tolist()
        assert (b["input_ids"][k, lens[k]:] == -1).all()
    assert b["attention_mask"].sum(1).tolist() == lens.tolist() and b["last"].tolist() == (lens - 1).tolist()
    assert b["slots"].tolist() == enc.slots[rows].tolist()
    assert (b["uid"].tolist(), b["iid"].tolist(), b["label"].tolist()) == ([1, 1, 6], [6, 1, 6], [1, 1, 0])


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line naming the file, row or flag (UsageError; `error:` + exit 2 from the CLI)


def broken(rows, flag=-1, **columns):
    """A frame of `rows` with some columns overwritten."""
    df = frame(rows, flag)
    for c, v in columns.items():
        df[c] = v
    return df


@pytest.mark.parametrize("frames,words", [
    (dict(test=frame(TEST, 1).drop(columns=["his_title"])), ["test_ood2.pkl", "missing column(s) his_title"]),
    (dict(train=broken(TRAIN, uid=[1] * 11 + [0])), ["train_ood2.pkl", "row 11", "uid 0"]),
    (dict(valid=broken(VALID, 0, iid=[6, -2, 2])), ["valid_ood2.pkl", "row 1", "iid -2"]),
    (dict(valid=broken(VALID, 0, uid=[1.0, 2.5, 3.0])), ["valid_ood2.pkl", "row 1", "uid 2.5", "integer ids"]),
    (dict(test=broken(TEST, 1, iid=[str(i) for i in frame(TEST).iid])), ["test_ood2.pkl", "row 0", "iid '", "integer"]),
    (dict(test=broken(TEST, 1, label=[1, 0, 2, 0, 1, 0, 1, 0])), ["test_ood2.pkl", "row 2", "label 2"]),
    (dict(test=broken(TEST, 1, his_title=[[""]] * 8)), ["test_ood2.pkl", "row 0", "5 items but 1 titles"]),
    (dict(valid=broken(VALID, 0, his=[[0, 1, 3, 4], [1, 2, 4, 4], [0]])), ["valid_ood2.pkl", "row 1", "0 sentinel"]),
    (dict(valid=broken(VALID, 0, his=[[0, 1, 3, 4], [0, 1, 0, 4], [0]])), ["valid_ood2.pkl", "row 1", "item id 0"]),
    (dict(test=broken(TEST, 1, his=[[0, 1, 3, 4, 99]] + [h for h in frame(TEST).his[1:]])),
     ["test_ood2.pkl", "history item id 99", "largest target item id 6"]),
    (dict(test=broken(TEST, 1, his_title=[*frame(TEST).his_title[:2], float("nan"), *frame(TEST).his_title[3:]])),
     ["test_ood2.pkl", "row 2", "his_title is nan", "expected a list"]),
], ids=["missing column", "uid 0", "negative iid", "fractional uid", "string iid", "label 2", "title count", "no sentinel", "history id 0",
        "history id beyond table", "NaN title list"])
def test_bad_pickles_name_file_and_row(tmp_path, frames, words):
    with pytest.raises(data.UsageError) as e:
        data.load_dataset(write_dataset(tmp_path, **frames), tmp_path)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_missing_files_name_what_is_missing(tmp_path):
    with pytest.raises(data.UsageError, match="--data nope: no .*nope.train_ood2.pkl"):
        data.load_dataset("nope", tmp_path)
    write_dataset(tmp_path)
    os.remove(tmp_path / "tiny" / "test_ood2.pkl")
    with pytest.raises(data.UsageError) as e:
        data.load_dataset("tiny", tmp_path)
    assert str(tmp_path / "tiny" / "test_ood2.pkl") in str(e.value) and "valid_ood2" not in str(e.value)
    write_dataset(tmp_path)
    (tmp_path / "tiny" / "test_ood2.pkl").write_bytes(b"\x00garbage, not a pickle")
    with pytest.raises(data.UsageError, match="test_ood2.pkl: cannot read as a pickled pandas DataFrame"):
        data.load_dataset("tiny", tmp_path)
    pd.to_pickle([1, 2, 3], tmp_path / "tiny" / "test_ood2.pkl")
    with pytest.raises(data.UsageError, match="test_ood2.pkl: holds a list, expected a pandas DataFrame"):
        data.load_dataset("tiny", tmp_path)


def test_a_zip_missing_one_pickle_names_it(tmp_path):
    """Three of the four pickles: was "put ml-1m.zip there", where it already was."""
    write_dataset(tmp_path, "ml-1m")
    with zipfile.ZipFile(tmp_path / "root.zip", "w") as zf:
        for s in ("train", "valid", "test"):
            zf.write(tmp_path / "ml-1m" / f"{s}_ood2.pkl", f"ml-1m/{s}_ood2.pkl")
    os.makedirs(tmp_path / "root")
    os.replace(tmp_path / "root.zip", tmp_path / "root" / "ml-1m.zip")
    with pytest.raises(data.UsageError) as e:
        data.load_dataset("ml-1m", tmp_path / "root")
    assert str(e.value) == (f"{tmp_path / 'root' / 'ml-1m.zip'}: holds ml-1m/train_ood2.pkl, ml-1m/valid_ood2.pkl, "
                            f"ml-1m/test_ood2.pkl but no ml-1m/valid_small_ood2.pkl; a dataset zip needs all four pickles")


def test_killed_writes_leave_nothing_the_next_write_keeps(tmp_path):
    """A write killed mid-way (no `finally`) leaves path.tmpPID; the next write of that path removes
    it when its process is gone, and leaves a live writer's alone."""
    gone = [int(run_python("-c", "import os; print(os.getpid())").stdout) for _ in range(2)]  # exited
    (tmp_path / f"m.json.tmp{gone[0]}").write_text("half")
    os.makedirs(tmp_path / f"m.json.tmp{gone[1]}" / "inner")  # a folder (an export, a split being built)
    (tmp_path / f"m.json.tmp{os.getppid()}").write_text("being written")  # our parent: alive
    (tmp_path / "other.json.tmp1").write_text("not this path's")
    data.write_atomic(str(tmp_path / "m.json"), lambda tmp: open(tmp, "w").write("{}"))
    assert sorted(os.listdir(tmp_path)) == ["m.json", f"m.json.tmp{os.getppid()}", "other.json.tmp1"]


def test_fingerprint_tells_splits_of_one_size_apart(tmp_path):
    a = data.load_dataset(write_dataset(tmp_path / "a"), tmp_path / "a")
    flipped = frame(TRAIN)
    flipped.loc[0, "label"] = 0  # one label differs; every id and table size is the same
    b = data.load_dataset(write_dataset(tmp_path / "b", train=flipped), tmp_path / "b")
    assert (a.user_num, a.item_num) == (b.user_num, b.item_num)
    assert data.fingerprint(a) == data.fingerprint(data.load_dataset("tiny", tmp_path / "a")) != data.fingerprint(b)


def test_templates_must_hold_the_placeholders_of_their_mode(tmp_path):
    text_only = tmp_path / "text_only.txt"
    text_only.write_text("Liked: <ItemTitleList>. Likes <TargetItemTitle>?")
    assert data.load_template("movie", "text", text_only).startswith("Liked:")
    with pytest.raises(data.UsageError, match=r"text_only\.txt: a collm template .*wrong count of <UserID> <TargetItemID>"):
        data.load_template("movie", "collm", text_only)
    slots = tmp_path / "slots.txt"
    slots.write_text("<ItemTitleList> <UserID> <TargetItemTitle> <TargetItemID>")
    with pytest.raises(data.UsageError, match=r"slots\.txt: a text template must not contain <UserID> <TargetItemID>"):
        data.load_template("movie", "text", slots)
    with pytest.raises(data.UsageError, match=r"absent\.txt: cannot read prompt template"):
        data.load_template("movie", "text", tmp_path / "absent.txt")


def test_cli_flags_checked_in_process(tmp_path):
    write_dataset(tmp_path)
    for row in (8, -1):
        with pytest.raises(data.UsageError, match=f"--show {row}: test has rows 0..7"):
            prepare.main(["--data", "tiny", "--data-root", str(tmp_path), "--show", str(row)])


def _garbage(root):
    name = write_dataset(root)
    (root / name / "test_ood2.pkl").write_bytes(b"\x00garbage")
    return ["--data", name, "--stats"]


def _no_slots(root):
    (root / "t.txt").write_text("<ItemTitleList> <TargetItemTitle>")
    return ["--data", write_dataset(root), "--show", 0, "--prompt", "collm", "--template", root / "t.txt"]


@pytest.mark.parametrize("args,words", [
    (lambda root: ["--data", "nope", "--stats"], ["--data nope", "train_ood2.pkl"]),
    (_garbage, ["test_ood2.pkl", "cannot read"]),
    (lambda root: ["--data", write_dataset(root), "--show", 8], ["--show 8"]),
    (_no_slots, ["t.txt", "<UserID>"]),
], ids=["unknown dataset", "garbage pickle", "show out of range", "template without slots"])
def test_cli_errors_are_one_line_exit_2(tmp_path, args, words):
    assert_error_line(*data_cli(*args(tmp_path), root=tmp_path), *words)
