"""Tests for the Amazon-Book builder in tools/prepare.py (the authors' notebook
dataset/amazon_book/processing_ood.ipynb), on small generated files in the exact raw format of Amazon
Review Data 2018: gzip JSON lines, `Books_5.json.gz` (reviews) and `meta_Books.json.gz` (metadata).

Run as a script, it writes the large generated files the README's scale figures were measured on:

    python tests/test_amazon.py --scale /tmp/amazon-scale/amazon-book 3000000
"""
import argparse
import gzip
import json
import os
import sys
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from tools import prepare  # noqa: E402
from conftest import assert_error_line, run_python  # noqa: E402


def ts(*when):
    return int(datetime(*when, tzinfo=timezone.utc).timestamp())


def review_line(user, asin, stars, t, text="Loved every page of it."):
    """One line of Books_5.json.gz, with every field the 2018 files carry."""
    d = datetime.fromtimestamp(t, tz=timezone.utc)
    return json.dumps({"overall": float(stars), "verified": True, "reviewTime": f"{d:%m %d, %Y}", "reviewerID": user,
                       "asin": asin, "style": {"Format:": " Paperback"}, "reviewerName": "A Reader",
                       "reviewText": text, "summary": "Five Stars", "unixReviewTime": t})


def meta_line(asin, title=None, filler=""):
    """One line of meta_Books.json.gz; title None leaves the field out."""
    m = {"category": ["Books", "Literature & Fiction"], "tech1": "", "description": [filler], "fit": "",
         "also_buy": ["0000000001", "0000000002"], "tech2": "", "brand": "An Author", "feature": [],
         "rank": "1,234 in Books (", "also_view": [], "main_cat": "Books", "similar_item": "", "date": "",
         "price": "$9.99", "asin": asin, "imageURL": [], "imageURLHighRes": []}
    if title is not None:
        m["title"] = title
    return json.dumps(m)


def write_gz(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
        for line in lines:
            f.write(line + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# A hand-made pair of files whose split is stated below, row by row. The threshold is lowered from
# "more than 20" to "more than 2" ratings so that a dozen lines exercise every rule.

META = [("B0", "Never Reviewed"), ("B2", "Old Title of Book Two"), ("B1", "Book One"),
        ("B2", "Book Two"),        # keep='last': B2 takes this line's title and place, after B1
        ("B3", "Book Three"),
        ("B3", "Book Three var d = new Date(); d.getTime()"),  # an unformatted line: dropped, B3 keeps line 5
        ("B4", "Book Four"), ("B5", None)]                    # B5 has no title but is never kept: fine
REVIEWS = [  # (user, asin, stars, time) in file order
    ("U2", "B1", 5, ts(2017, 3, 1)),            # k0
    ("U1", "B2", 5, ts(2017, 1, 5)),            # k1
    ("U1", "B1", 4, ts(2017, 2, 1)),            # k2  4 stars: a negative
    ("U1", "B3", 5, ts(2017, 12, 10, 12)),      # k3  December, same second as k14
    ("U2", "B2", 3, ts(2017, 12, 5)),           # k4
    ("U2", "B3", 5, ts(2017, 12, 20)),          # k5
    ("U3", "B1", 5, ts(2016, 12, 31, 23, 59, 59)),  # k6  2016: dropped
    ("U3", "B1", 2, ts(2017, 4, 1)),            # k7
    ("U3", "B4", 5, ts(2017, 5, 1)),            # k8  B4 has 2 ratings: dropped
    ("U3", "B4", 5, ts(2017, 5, 1)),            # k9  the same review twice: both count
    ("U1", "B1", 5, ts(2018, 1, 1)),            # k10 2018: dropped
    ("U4", "B3", 5, ts(2017, 6, 1)),            # k11 U4 has 2 joined ratings: dropped (B3 still counts it)
    ("U4", "B9", 5, ts(2017, 6, 2)),            # k12 no metadata for B9: dropped by the join, never counted
    ("U4", "B2", 5, ts(2017, 7, 1)),            # k13
    ("U1", "B2", 5, ts(2017, 12, 10, 12)),      # k14 joins before k3 (B2's metadata line comes first)
]
# Counted once on the joined 2017 rows: U1 4, U2 3, U3 3 (k7-k9), U4 2; B1 3, B2 4, B3 3, B4 2.
# Kept: k0-k5, k7, k14. U3 ends with one row and B3 with two: the filter is not repeated.
# Join order, by metadata place B1 < B2 < B3: k0 k2 k7 | k1 k4 k14 | k3 k5, so
# users by first appearance U2=1 U1=2 U3=3; books B1=1 B2=2 B3=3.
# Train = k0 k2 k7 k1; December by time, ties in join order: k4 k14 k3 k5 -> valid k4 k14, test k3 k5.
# (uid, iid, label, history) in the (user, time) listing:
EXPECTED = {
    "train": [("k0", 1, 1, 1, []), ("k1", 2, 2, 1, []), ("k2", 2, 1, 0, [2]), ("k7", 3, 1, 0, [])],
    "valid": [("k4", 1, 2, 0, [1]), ("k14", 2, 2, 1, [2])],
    "test": [("k5", 1, 3, 1, [1]), ("k3", 2, 3, 1, [2, 2])],  # duplicates stay in a history
}
LISTING_POSITION = {"k0": 0, "k4": 1, "k5": 2, "k1": 3, "k2": 4, "k14": 5, "k3": 6, "k7": 7}
NOT_COLD = {"train": [1, 1, 1, 1], "valid": [1, 1], "test": [0, 0]}  # book 3 has no train row
TITLES = {1: "Book One", 2: "Book Two", 3: "Book Three"}


def write_hand_made(folder, reviews=None, meta=None):
    reviews = [review_line(*r) for r in REVIEWS] if reviews is None else reviews
    meta = [meta_line(*m) for m in META] if meta is None else meta
    write_gz(os.path.join(folder, "Books_5.json.gz"), reviews)
    write_gz(os.path.join(folder, "meta_Books.json.gz"), meta)
    return folder


def test_hand_made_files_give_the_stated_split(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "AMAZON_MIN_RATINGS", 2)
    prepare.build_amazon_book_split(write_hand_made(tmp_path / "raw"), tmp_path / "out")
    frames = {s: pd.read_pickle(tmp_path / "out" / f"{s}_ood2.pkl") for s in data.SPLITS}
    for split, flag in (("train", -1.0), ("valid", 0.0), ("test", 1.0)):
        df, want = frames[split], EXPECTED[split]
        assert list(df.columns) == ["uid", "iid", "label", "timestamp", "his", "his_title", "title", "flag", "not_cold"]
        assert df.index.tolist() == [LISTING_POSITION[k] for k, *_ in want]
        assert df.uid.tolist() == [u for _, u, _, _, _ in want]
        assert df.iid.tolist() == [i for _, _, i, _, _ in want]
        assert df.label.tolist() == [y for _, _, _, y, _ in want]
        assert df.timestamp.tolist() == [REVIEWS[int(k[1:])][3] for k, *_ in want]
        assert df.his.tolist() == [[0] + h for *_, h in want]
        assert df.his_title.tolist() == [[""] + [TITLES[i] for i in h] for *_, h in want]
        assert df.title.tolist() == [TITLES[i] for _, _, i, _, _ in want]
        assert df.not_cold.tolist() == NOT_COLD[split] and (df.flag == flag).all()
    pd.testing.assert_frame_equal(frames["valid_small"], frames["valid"].sample(frac=0.25, random_state=2023))


# ---------------------------------------------------------------------------------------------
# Generated files at the real threshold, checked against the notebook's own pandas steps


def write_generated(folder, n_lines, seed=0, users=None, books=None, text_len=40, meta_extra=0, share_2017=0.4,
                    uniform=False, untitled=0.0):
    """Random raw files: `share_2017` of the reviews in 2017 on a dense set of users and books (zipf-
    skewed, so some pass the >20 filter and some do not; or uniform, for a split the size of the
    paper's), the rest in other years; metadata in shuffled order with some duplicates and
    `meta_extra` books never reviewed; `untitled` of the books without a title (half of them with no
    'title' field, half with an empty one). Written line by line, so n_lines can be millions."""
    rng = np.random.default_rng(seed)
    users = users or max(30, n_lines // 120)
    books = books or max(40, n_lines // 90)
    texts = ["".join(rng.choice(list("abcdefghij klmnopqrst uvwxyz. "), text_len)) for _ in range(100)]
    asins = [f"{1000000000 + b:010d}" for b in range(books)]
    lo, hi = prepare.YEAR_2017
    chunk = 100_000

    def reviews():
        for start in range(0, n_lines, chunk):
            n = min(chunk, n_lines - start)
            in_2017 = rng.random(n) < share_2017
            u_2017 = rng.integers(0, users, n) if uniform else rng.zipf(1.3, n) % users
            b_2017 = rng.integers(0, books, n) if uniform else rng.zipf(1.2, n) % books
            u = np.where(in_2017, u_2017, rng.integers(0, 10 * users, n))
            b = np.where(in_2017, b_2017, rng.integers(0, books + 500, n))
            t = np.where(in_2017, rng.integers(lo, hi, n), rng.integers(ts(2010, 1, 1), ts(2018, 10, 1), n))
            month_start = t.astype("datetime64[s]").astype("datetime64[M]").astype("datetime64[s]").astype(np.int64)
            t = np.where(rng.random(n) < 0.2, month_start, t)  # same-second reviews: their order is the join's
            stars = rng.choice([1, 2, 3, 4, 5], n, p=[0.05, 0.05, 0.1, 0.17, 0.63])
            for k in range(n):
                yield review_line(f"A{u[k]:012d}", f"{1000000000 + b[k]:010d}", stars[k], int(t[k]), texts[k % 100])

    def meta():
        order = rng.permutation(books + meta_extra)
        for k in order.tolist():
            asin = asins[k] if k < books else f"X{k:09d}"
            if rng.random() < 0.05:  # a duplicate line with another title: the later one counts
                yield meta_line(asin, f"Old edition of {asin}", texts[k % 100])
            if untitled and rng.random() < untitled:  # (untitled=0 draws nothing: the other files stay as they were)
                yield meta_line(asin, None if k % 2 else "", texts[k % 100])
            else:
                yield meta_line(asin, f"The Book of {asin}", texts[k % 100])

    write_gz(os.path.join(folder, "Books_5.json.gz"), reviews())
    write_gz(os.path.join(folder, "meta_Books.json.gz"), meta())
    return folder


def notebook_split(folder):
    """The notebook's cells, nearly verbatim, in pandas (December sorted stably, as tools/prepare.py does)."""
    df = pd.read_json(os.path.join(folder, "Books_5.json.gz"), lines=True, dtype=False)
    df_meta = pd.read_json(os.path.join(folder, "meta_Books.json.gz"), lines=True, dtype=False)
    rating = df[["asin", "reviewerID", "overall", "unixReviewTime"]]
    rating.columns = ["asin", "user", "rating", "timestamp"]
    df3 = df_meta.fillna("")
    meta_data = df3[~df3.title.str.contains("getTime")][["asin", "title"]]
    meta_data = meta_data.drop_duplicates(subset=["asin"], keep="last")
    rating_ = rating.merge(meta_data, on="asin", how="right").dropna()
    rating_.columns = ["iid", "uid", "rating", "timestamp", "title"]
    rating_["time"] = pd.to_datetime(rating_.timestamp, unit="s").map(lambda x: x.year)
    s_rating = rating_[rating_.time.isin([2017])].copy()
    s_rating["time"] = pd.to_datetime(s_rating.timestamp, unit="s").map(lambda x: x.month)
    item_info = s_rating.groupby("iid").agg({"rating": "count"})
    user_info = s_rating.groupby("uid").agg({"rating": "count"})
    s_rating = s_rating[s_rating["uid"].isin(user_info[user_info["rating"] > 20].index)]
    s_rating = s_rating[s_rating["iid"].isin(item_info[item_info["rating"] > 20].index)]
    s_rating["label"] = s_rating["rating"].apply(lambda x: 1 if x >= 5 else 0)
    users, items = s_rating.uid.unique(), s_rating.iid.unique()
    s_rating["uid"] = s_rating["uid"].map(dict(zip(users, np.arange(users.shape[0]) + 1)))
    s_rating["iid"] = s_rating["iid"].map(dict(zip(items, np.arange(items.shape[0]) + 1)))
    rating_train = s_rating[s_rating.time.isin(range(1, 12))].copy()
    rating_valid_test = s_rating[s_rating.time.isin([12])].copy()
    rating_valid_test = rating_valid_test.sort_values(by="timestamp", kind="stable")  # the notebook: inplace, quicksort
    n_ = rating_valid_test.shape[0] // 2
    rating_train["flag"] = -1.0
    valid, test = rating_valid_test.iloc[:n_].copy(), rating_valid_test.iloc[n_:].copy()
    valid["flag"], test["flag"] = 0.0, 1.0
    data_ = pd.concat([rating_train, valid, test], axis=0, ignore_index=True).sort_values(by=["uid", "timestamp"])
    data_ = data_.reset_index(drop=True)
    his_ = []
    for _, x in data_.groupby("uid"):  # deal_with_each_u
        his = [0]
        for i, y in zip(x.iid, x.label):
            his_.append(list(his))
            if y > 0:
                his.append(i)
    data_["his"] = his_
    train_user, train_item = set(data_.uid[data_.flag == -1]), set(data_.iid[data_.flag == -1])
    data_["not_cold"] = [int(u in train_user and i in train_item) for u, i in zip(data_.uid, data_.iid)]
    return data_


def built_like_the_notebook(raw, out):
    """Build `raw` into `out`, check it row for row against notebook_split -> the built rows."""
    prepare.build_amazon_book_split(str(raw), out)
    got = pd.concat([pd.read_pickle(out / f"{s}_ood2.pkl") for s in ("train", "valid", "test")]).sort_index()
    want = notebook_split(raw)
    assert len(got) == len(want) > 500 and (got.flag == 0).sum() > 20
    for col in ("uid", "iid", "label", "timestamp", "title", "flag", "not_cold"):
        assert got[col].tolist() == want[col].astype(got[col].dtype).tolist(), col
    assert got.his.tolist() == want.his.tolist()
    return got


def test_generated_files_match_the_notebooks_pandas_steps(tmp_path):
    raw = write_generated(tmp_path / "amazon-book", 6000, seed=1)
    built_like_the_notebook(raw, tmp_path / "out")
    assert notebook_split(raw).duplicated(["uid", "timestamp"]).sum() > 50  # enough same-second rows for the order to matter


def test_untitled_books_are_kept_as_the_notebook_keeps_them(tmp_path):
    """The notebook fills a missing title with '' and keeps the book; so do we, and --stats says how many."""
    raw = write_generated(tmp_path / "amazon-book", 6000, seed=3, untitled=0.3)
    got = built_like_the_notebook(raw, tmp_path / "out")
    untitled = set(got.iid[got.title == ""])
    assert len(untitled) >= 2
    res = run_python("tools/prepare.py", "--data", "amazon-book", "--stats", env={"COLLM_DATA": tmp_path}, timeout=120)
    assert res.returncode == 0, res.stderr
    warning = res.stdout.splitlines()[-1]
    assert warning.startswith(f"warning: {len(untitled)} items have no title"), warning


def test_stats_cli_on_generated_files(tmp_path):
    write_generated(tmp_path / "amazon-book", 6000, seed=2)
    res = run_python("tools/prepare.py", "--data", "amazon-book", "--stats", env={"COLLM_DATA": tmp_path}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "build_amazon_book_split" in res.stdout.splitlines()[0]  # built, and said so
    lines = res.stdout.splitlines()[1:]
    assert lines[0].startswith("amazon-book: users ") and lines[0].endswith("domain book")
    assert [line.split()[0] for line in lines[2:6]] == ["train", "valid", "test", "valid_small"]
    assert "built by tools/prepare.py" in lines[6]
    d = data.load_dataset("amazon-book", tmp_path)  # the second load reads the cache
    assert d.source == lines[6][len("source: "):]
    assert len(d.splits["valid_small"]) == round(0.25 * len(d.splits["valid"]))
    assert abs(len(d.splits["valid"]) - len(d.splits["test"])) <= 1
    prompt = data.render_prompt(data.prompt_segments(data.load_template("book", "text"), ["A"], "B"))
    assert "books" in prompt and '"B"' in prompt


# ---------------------------------------------------------------------------------------------
# Bad raw files: one `error:` line, exit 2, nothing half-written


def _truncated(folder):
    write_hand_made(folder)
    path = os.path.join(folder, "Books_5.json.gz")
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[:len(blob) // 2])
    return ["Books_5.json.gz", "not a complete gzip file"]


def _not_json(folder):
    write_hand_made(folder, reviews=[review_line(*r) for r in REVIEWS[:3]] + ['{"overall": 5.0, "asin": "B1"'])
    return ["Books_5.json.gz", "line 4", "not JSON"]


def _no_overall(folder):
    bad = json.loads(review_line(*REVIEWS[1]))
    del bad["overall"]
    write_hand_made(folder, reviews=[review_line(*REVIEWS[0]), json.dumps(bad)])
    return ["Books_5.json.gz", "line 2", "no 'overall'"]


@pytest.mark.parametrize("make", [_truncated, _not_json, _no_overall],
                         ids=["truncated gzip", "line not JSON", "review without overall"])
def test_bad_raw_files_are_one_error_line(tmp_path, monkeypatch, make):
    monkeypatch.setattr(prepare, "AMAZON_MIN_RATINGS", 2)
    folder = tmp_path / "amazon-book"
    words = make(str(folder))
    before = sorted(os.listdir(folder))
    with pytest.raises(data.UsageError) as e:
        prepare.prepare("amazon-book", str(tmp_path))
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    assert sorted(os.listdir(folder)) == before and os.listdir(data.cache_dir()) == []  # nothing half-written


def test_bad_raw_file_from_the_cli_exits_2(tmp_path):
    _truncated(str(tmp_path / "amazon-book"))
    res = run_python("tools/prepare.py", "--data", "amazon-book", env={"COLLM_DATA": tmp_path}, timeout=60)
    assert_error_line(res.returncode, res.stderr, "Books_5.json.gz")


def test_a_zip_of_the_pickles_is_read_in_place(tmp_path, monkeypatch):
    import zipfile
    monkeypatch.setattr(prepare, "AMAZON_MIN_RATINGS", 2)
    prepare.build_amazon_book_split(write_hand_made(tmp_path / "raw"), tmp_path / "out")
    with zipfile.ZipFile(tmp_path / "amazon-book.zip", "w") as zf:  # a folder named otherwise inside
        for s in data.SPLITS:
            zf.write(tmp_path / "out" / f"{s}_ood2.pkl", f"book/{s}_ood2.pkl")
    d = data.load_dataset("amazon-book", tmp_path)
    assert d.source == f"the four pickles in {tmp_path / 'amazon-book.zip'}" and d.domain == "book"
    assert d.splits["test"].history(1).tolist() == [2, 2] and d.titles[1:] == ["Book One", "Book Two", "Book Three"]


def test_no_files_and_no_network_says_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "AMAZON_URLS", {n: "http://127.0.0.1:9/" + n for n in prepare.AMAZON_URLS})
    with pytest.raises(data.UsageError) as e:
        prepare.prepare("amazon-book", str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "download failed" in msg and "Books_5.json.gz + meta_Books.json.gz" in msg
    assert str(tmp_path / "amazon-book") in msg and str(tmp_path / "amazon-book.zip") in msg
    assert os.listdir(tmp_path / "amazon-book") == []  # no partial download left


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Write generated Amazon-Book raw files for the scale measurement.")
    p.add_argument("--scale", nargs=2, metavar=("FOLDER", "LINES"), required=True)
    a = p.parse_args()
    # 30% of the lines in 2017 on 23,000 users and 34,000 books, uniformly: about 780k rows pass the
    # >20 filter, the size of the paper's split; 300-character review texts (the real file averages
    # about 370 bytes a line); 400,000 extra metadata lines.
    write_generated(a.scale[0], int(a.scale[1]), seed=0, users=23_000, books=34_000, text_len=300,
                    meta_extra=400_000, share_2017=0.3, uniform=True)
