"""The results of a sweep of DVC experiments as one table: what each experiment changed, validation accuracy per
epoch, the test accuracy of the pick, training time.

    python benchmarks/sweep_table.py [--input exp_show.json] [--out DIR] [--all-test]

Reads `dvc exp show --json` (run in the current repository unless --input names a saved copy) and, per experiment,
metrics/train.json from its Git commit (`dvc exp show` leaves out lists such as the per-epoch accuracies). The pick
is the experiment with the highest final-epoch validation accuracy (ties: lower final validation loss, then the
order of `dvc exp show`); models/adapter is the final epoch's adapter, so that is the accuracy that belongs to it.
Test accuracy is shown for the pick only, so that the table cannot steer the choice; --all-test shows it for every
experiment (for an analysis after the choice). Prints the Markdown table; with --out DIR it also writes
DIR/sweep.md (the same table), DIR/sweep.json (one object per experiment), DIR/val_accuracy.csv (experiment, epoch,
val_accuracy: one row per point, ready to plot) and DIR/val_accuracy.svg (the chart). The committed sweep's files are
rewritten only when asked: --out benchmarks/results/sweep (make sweep-table SWEEP_OUT=benchmarks/results/sweep).
"""
import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from xml.sax.saxutils import escape

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, when run from anywhere

from common import dvc_command  # noqa: E402

NOT_SHOWN = "not looked at"


def flatten(tree, prefix=""):
    """{"train": {"epochs": 2}} -> {"train.epochs": 2}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def experiments(exp_show):
    """(name, rev, data) of every finished experiment that trained, and of each baseline commit that holds a trained
    run of params no experiment repeats. A queued or running experiment is left out: until it ends, `dvc exp show`
    gives it the workspace's metrics."""
    for baseline in exp_show:
        if baseline["rev"] == "workspace":
            continue
        finished = [(exp.get("name") or exp["revs"][0]["rev"][:7], exp["revs"][0]["rev"], exp["revs"][0]["data"])
                    for exp in baseline.get("experiments") or []
                    if (exp.get("executor") or {}).get("state", "success") == "success"
                    and metric(exp["revs"][0].get("data"), "metrics/train.json", "epochs")]
        data = baseline.get("data")
        if metric(data, "metrics/train.json", "epochs") and all(d["params"] != data["params"] for _, _, d in finished):
            yield baseline.get("name") or baseline["rev"][:7], baseline["rev"], data
        yield from finished


def metric(data, path, key):
    return (((data or {}).get("metrics") or {}).get(path) or {}).get("data", {}).get(key)


def train_metrics(rev, data):
    """metrics/train.json of the experiment's commit; what `dvc exp show` kept of it when Git has no such commit."""
    shown = subprocess.run(["git", "show", f"{rev}:metrics/train.json"], capture_output=True, text=True)
    if shown.returncode == 0:
        return json.loads(shown.stdout)
    return (data["metrics"].get("metrics/train.json") or {}).get("data", {})


def rows(exp_show, all_test=False):
    found = list(experiments(exp_show))
    if not found:
        sys.exit("sweep_table: `dvc exp show` lists no finished experiment with metrics; run the sweep first "
                 "(docs/experiments.md)")
    params = [flatten(data["params"].get("params.yaml", {}).get("data", {})) for _, _, data in found]
    varying = sorted(k for k in set().union(*params) if len({json.dumps(p.get(k)) for p in params}) > 1)
    table = []
    for (name, rev, data), values in zip(found, params):
        train = train_metrics(rev, data)
        val_accuracy, val_loss = train.get("val_accuracy_per_epoch") or [], train.get("val_loss_per_epoch") or []
        table.append({
            "experiment": name,
            "rev": rev,
            "params": {k: values.get(k) for k in varying},
            "val_accuracy_per_epoch": val_accuracy,
            "final_val_accuracy": val_accuracy[-1] if val_accuracy else None,
            "final_val_loss": val_loss[-1] if val_loss else None,
            "test_accuracy": metric(data, "metrics/finetuned.json", "accuracy"),
            "baseline_test_accuracy": metric(data, "metrics/baseline.json", "accuracy"),
            "train_seconds": (train.get("time") or {}).get("total_seconds"),
            "finetune_wall_seconds": (train.get("resources") or {}).get("wall_seconds"),
            "device": train.get("device"),
        })
    scored = [i for i, r in enumerate(table) if r["final_val_accuracy"] is not None]
    pick = max(scored, key=lambda i: (table[i]["final_val_accuracy"], -(table[i]["final_val_loss"] or 0), -i),
               default=None)
    for i, row in enumerate(table):
        row["pick"] = i == pick
        if not (all_test or row["pick"]):
            row["test_accuracy"] = NOT_SHOWN
    return table, varying


def markdown(table, varying):
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return "—" if value is None else str(value)

    head = ["experiment", *varying, "val accuracy per epoch", "test accuracy", "train s", "finetune wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        name = f"**{row['experiment']}** (pick)" if row["pick"] else row["experiment"]
        curve = " → ".join(f"{a:.2f}" for a in row["val_accuracy_per_epoch"]) or "—"
        cells = [name, *(cell(row["params"][k]) for k in varying), curve, cell(row["test_accuracy"]),
                 cell(row["train_seconds"]), cell(row["finetune_wall_seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def svg_curves(table, width=820, height=360):
    """Validation accuracy per epoch of every experiment as a line chart (SVG text, no plotting library): x = epoch,
    y = accuracy from 0 to 1, one line and legend entry per experiment, the pick drawn thicker."""
    left, right, top, bottom = 50, 330, 20, 40
    epochs = max((len(r["val_accuracy_per_epoch"]) for r in table), default=1)

    def x(epoch):
        return left + (epoch - 1) / max(epochs - 1, 1) * (width - left - right)

    def y(accuracy):
        return top + (1 - accuracy) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>']
    for tick in (0, 0.25, 0.5, 0.75, 1):
        parts.append(f'<line x1="{left}" y1="{y(tick):.1f}" x2="{width - right}" y2="{y(tick):.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    for epoch in range(1, epochs + 1):
        parts.append(f'<text x="{x(epoch):.1f}" y="{height - bottom + 16}" text-anchor="middle">{epoch}</text>')
    parts.append(f'<text x="{(left + width - right) / 2:.1f}" y="{height - 6}" text-anchor="middle">epoch</text>'
                 f'<text x="14" y="{(top + height - bottom) / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(top + height - bottom) / 2:.1f})">validation accuracy</text>')
    for i, row in enumerate(table):
        colour, stroke = COLOURS[i % len(COLOURS)], 3 if row["pick"] else 1.5
        points = " ".join(f"{x(e):.1f},{y(a):.1f}" for e, a in enumerate(row["val_accuracy_per_epoch"], 1))
        label = row["experiment"] + "".join(f" {k.split('.')[-1]}={v}" for k, v in row["params"].items())
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="{stroke}" points="{points}"/>'
                     f'<line x1="{width - right + 10}" y1="{top + 8 + 16 * i}" x2="{width - right + 30}" '
                     f'y2="{top + 8 + 16 * i}" stroke="{colour}" stroke-width="{stroke}"/>'
                     f'<text x="{width - right + 34}" y="{top + 12 + 16 * i}">{escape(label)}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def write_files(out, table, text):
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(text)
    (out / "sweep.json").write_text(json.dumps(table, indent=2) + "\n")
    with open(out / "val_accuracy.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["experiment", "epoch", "val_accuracy"])
        for row in table:
            writer.writerows([row["experiment"], epoch, a] for epoch, a in enumerate(row["val_accuracy_per_epoch"], 1))
    (out / "val_accuracy.svg").write_text(svg_curves(table))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="a saved `dvc exp show --json`; default: run it here")
    parser.add_argument("--out", help="also write sweep.{md,json}, val_accuracy.{csv,svg} into this directory "
                                      "(benchmarks/results/sweep holds the committed sweep's); default: print only")
    parser.add_argument("--all-test", action="store_true", help="test accuracy of every experiment, not only the pick")
    args = parser.parse_args()
    if args.input:
        exp_show = json.loads(Path(args.input).read_text())
    else:
        shown = subprocess.run([*dvc_command(), "exp", "show", "--json"], capture_output=True, text=True)
        if shown.returncode != 0:
            sys.exit(f"sweep_table: `dvc exp show --json` failed: {shown.stderr.strip()[-300:]}")
        exp_show = json.loads(shown.stdout)
    table, varying = rows(exp_show, args.all_test)
    text = markdown(table, varying)
    if args.out:
        write_files(Path(args.out), table, text)
    print(text, end="")


if __name__ == "__main__":
    main()
