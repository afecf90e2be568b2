"""tools/results.py: read finished runs back: the results table, the valid curves of a study, plots.

    python tools/results.py --table runs/mf runs/lora runs/cie-mf            # the results table of finished runs
    python tools/results.py --table RUN_DIRS --json checkpoints/results.json # ... and their rows as JSON
    python tools/results.py --curves runs/cie-mf runs/cie-mf-tune-rec        # valid AUC at each scoring
    python tools/results.py --plot runs/lora runs/cie-mf --out curves.png    # valid AUC and loss vs samples seen

Every run folder (train.py's or collab.py's --out) holds a metrics.json (eval.write_metrics); this
reads nothing else (collab.MODELS only for each model's name).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the chapters, one folder up
import collab  # noqa: E402  (its model table names each model)
import data  # noqa: E402
from data import UsageError  # noqa: E402
from eval import read_metrics  # noqa: E402

# The paper's ML-1M test numbers (its table of overall results; the LLM rows with Vicuna-7B), printed beside ours.
PAPER_ML1M = {"MF": (0.6482, 0.6361), "LightGCN": (0.5959, 0.6499), "SASRec": (0.7078, 0.6884),
              "DIN": (0.7166, 0.6459), "TALLRec": (0.7097, 0.6818), "CoLLM-MF": (0.7295, 0.6875),
              "CoLLM-LightGCN": (0.7100, 0.6967), "CoLLM-SASRec": (0.7235, 0.6990), "CoLLM-DIN": (0.7243, 0.6897)}
# pop (the popularity anchor) is not in the paper: its rows show "-" in the paper column


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
    return f"CoLLM-{collab.MODELS[config['rec']].name}", variant(config)


def result_row(run):
    """A run folder (train.py's or collab.py's) -> one results row: what the table prints and what
    --json keeps."""
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
            method, llm, rec, kind, stage1 = collab.MODELS[config["model"]].name, "-", config["model"], "-", None
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
    here = os.path.dirname(os.path.abspath(path))
    old = []
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except ValueError:  # not JSON (or cut short)
            old = None
        if not (isinstance(old, list) and all(isinstance(r, dict) and "name" in r for r in old)):
            raise UsageError(f"--json {path}: not a results list written by tools/results.py --table --json (move it "
                             f"aside to start a new one)")
    new = {r["name"]: r for r in rows}
    rows = [new.pop(r["name"], r) for r in old] + list(new.values())
    rows = [{**r, "shipped": os.path.isdir(os.path.join(here, r["name"]))} for r in rows]

    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
    data.write_atomic(path, dump)
    return rows


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
    data.write_atomic(out, lambda tmp: fig.savefig(tmp, format=os.path.splitext(out)[1][1:] or "png"))
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Tabulate finished runs (--table), their valid AUC at each scoring "
                                            "(--curves) or draw their learning curves (--plot). To score a "
                                            "checkpoint: python tools/use.py --ckpt ...")
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
                         "of them); to score a checkpoint: python tools/use.py --ckpt CHECKPOINT")
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
    data.cli_main(main)
