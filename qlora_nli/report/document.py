"""reports/report.md: every section of the report, each rendered from the artifacts (`render`), and the
artifacts read and checked against each other first (`load_inputs`)."""
import logging
from pathlib import Path

from qlora_nli.analysis.features import EVIDENCE_MIN_N, error_change
from qlora_nli.analysis.probes import HYPOTHESIS_ONLY
from qlora_nli.data import artifacts
from qlora_nli.prompts import LABELS
from qlora_nli.report import markdown as md
from qlora_nli.runtime.errors import ArtifactError

log = logging.getLogger("report")


INPUTS = {  # name: (path, the shape every key this stage reads must have)
    "baseline": ("metrics/baseline.json", artifacts.EVAL_METRICS),
    "finetuned": ("metrics/finetuned.json", artifacts.EVAL_METRICS),
    "train": ("metrics/train.json", artifacts.TRAIN_METRICS),
    "comparison": ("metrics/comparison.json", artifacts.COMPARISON),
    "failures": ("reports/failure_cases.json", artifacts.FAILURE_CASES),
    "manifest": ("data/manifest.json", artifacts.MANIFEST),
}
METHODS = {
    "score": "each of the three label words is scored by its log-likelihood after the prompt and the most likely one "
             "is the prediction (no parsing, so no invalid outputs)",
    "generate": "greedy decoding after the prompt; the first label word in the output is the prediction, and an "
                "output with no label word is invalid and counts as wrong",
}


def load_inputs():
    art = {name: artifacts.read_document(path, shape) for name, (path, shape) in INPUTS.items()}
    art["sets"] = {}
    for model in ("baseline", "finetuned"):
        for path in sorted(Path("metrics/sets", model).glob("*.json")):
            if path.name == "index.json":  # the number of sets (evaluate.SETS_INDEX), not a set
                continue
            art["sets"].setdefault(path.stem, {})[model] = artifacts.read_document(path, artifacts.SET_METRICS)
    for name, models in art["sets"].items():
        if len(models) != 2:
            raise ArtifactError(f"metrics/sets/: extra set '{name}' is scored for {', '.join(models)} only; "
                                f"run dvc repro")
    # every number must come from the same run: a stale metrics file would make the report contradict itself
    for name in ("baseline", "finetuned"):
        got, want = art["comparison"][f"{name}_accuracy"], art[name]["accuracy"]
        if abs(got - want) > 1e-4 or art["comparison"]["n"] != art[name]["n"]:
            raise ArtifactError(f"{INPUTS['comparison'][0]}: accuracy {got} disagrees with {INPUTS[name][0]} "
                                f"({want}); artifacts are stale, run dvc repro")
    return art


def seconds(s):
    return f"{s:.1f} s ({s / 60:.1f} min)"


def data_section(manifest):
    lines = ["## Data\n",
             f"- Source: `{manifest.get('source')}`, read from `{manifest.get('read_from')}`.\n"]
    counts, hashes = manifest.get("counts", {}), manifest.get("raw_sha256", {})
    rows = [(split, c.get("raw"), c.get("unlabeled_dropped"), c.get("sampled"), f"`{hashes.get(split, 'n/a')}`")
            for split, c in counts.items()]
    lines.append(md.table(["split", "raw pairs", "unlabeled dropped", "sampled", "raw sha256"], rows))
    extra = {k: v for k, v in manifest.items() if k not in ("source", "read_from", "raw_sha256", "counts")}
    lines += [f"- {k}: `{v}`" for k, v in extra.items()]
    return lines


def method_section(base, tuned, comparison):
    methods = {base["method"], tuned["method"]}
    lines = ["\n## Evaluation method\n",
             f"Both models answer the same {comparison['n']} test pairs, formatted with the same prompt.\n"]
    lines += [f"- Method `{m}`: {METHODS.get(m, 'see the evaluate stage')}." for m in sorted(methods)]
    lines += [
        f"- Baseline: `{base['model']}` without adapter; fine-tuned: the same base with the LoRA adapter "
        f"`{tuned.get('adapter')}`.",
        "- Accuracy intervals: Wilson score 95%. Difference: paired 95% interval, "
        f"{comparison.get('ci_method', 'Newcombe method 10')}. Significance: exact McNemar test on the pairs where "
        "exactly one model is right.",
        f"- Evaluation time: baseline {base['eval_seconds']:.1f} s ({base['pairs_per_second']:.2f} pairs/s), "
        f"fine-tuned {tuned['eval_seconds']:.1f} s ({tuned['pairs_per_second']:.2f} pairs/s).\n",
    ]
    return lines


def accuracy_section(base, tuned, comparison):
    rows = [(name, md.pct(m["accuracy"]), md.ci(m["accuracy_ci95"]), f"{m['macro_f1']:.4f}", md.pct(m["invalid_rate"]))
            for name, m in (("baseline (pretrained)", base), ("fine-tuned", tuned))]
    lo, hi = comparison["difference_ci95"]
    verdict = ("the interval excludes 0" if lo > 0 or hi < 0
               else f"the interval includes 0: on {comparison['n']} pairs the difference is not resolved at 95%")
    lines = [
        "## 1. Accuracy: pretrained vs fine-tuned\n",
        md.table(["model", "accuracy", "95% CI", "macro-F1", "invalid outputs"], rows),
        f"Difference (fine-tuned minus baseline): {md.pp(comparison['difference'])}, "
        f"95% CI {md.ci(comparison['difference_ci95'], md.pp)}; {verdict}. "
        f"Exact McNemar p = {md.pvalue(comparison['mcnemar_p'])} ({comparison['corrected']} pairs corrected, "
        f"{comparison['regressed']} regressed, {comparison['both_right']} right for both, "
        f"{comparison['both_wrong']} wrong for both).\n",
        "### Per class\n",
    ]
    rows = []
    for label in LABELS:
        b, t = base["per_class"][label], tuned["per_class"][label]
        rows.append((label, b["support"], *(f"{b[k]:.4f}" for k in ("precision", "recall", "f1")),
                     *(f"{t[k]:.4f}" for k in ("precision", "recall", "f1"))))
    lines.append(md.table(["gold label", "support", "baseline P", "baseline R", "baseline F1",
                           "fine-tuned P", "fine-tuned R", "fine-tuned F1"], rows))
    dist = [(k, base["predicted_distribution"].get(k, 0), tuned["predicted_distribution"].get(k, 0))
            for k in (*LABELS, "invalid")]
    lines += ["### Predicted labels\n", md.table(["predicted", "baseline", "fine-tuned"], dist),
              "### Confusion matrices (rows gold, columns predicted; invalid outputs not included)\n",
              "Baseline:\n", md.confusion_matrix(base["confusion_matrix"], LABELS),
              "Fine-tuned:\n", md.confusion_matrix(tuned["confusion_matrix"], LABELS)]
    return lines


def time_section(train):
    t = train["time"]
    per_epoch = t["per_epoch_seconds"]  # None for an epoch whose checkpoint recorded no time
    measured = [s for s in per_epoch if s is not None]

    def at(key, i):
        values = train.get(key) or []
        return f"{values[i]:.4f}" if i < len(values) else "n/a"

    rows = [(i + 1, "resumed" if s is None else f"{s:.1f}", at("train_loss_per_epoch", i), at("val_loss_per_epoch", i),
             at("val_accuracy_per_epoch", i)) for i, s in enumerate(per_epoch)]
    tp = train.get("throughput", {})
    return [
        "\n## 2. Fine-tuning time\n",
        f"Total: {seconds(t['total_seconds'])} for {train['epochs']} epochs on {train['train_examples']} examples "
        f"(device `{train['device']}`, compute dtype `{train['compute_dtype']}`, 4-bit base: {train['load_in_4bit']}). "
        f"Mean per epoch: {seconds(sum(measured) / len(measured)) if measured else 'n/a'}"
        f"{f' ({len(per_epoch) - len(measured)} resumed epochs not timed)' if len(measured) < len(per_epoch) else ''}.\n",
        f"Data-parallel processes: {train.get('world_size', 1)} "
        f"(torch.distributed backend: {train.get('backend') or 'none, one process'}).\n",
        md.table(["epoch", "seconds", "train loss", "val loss", "val accuracy"], rows),
        f"Throughput: {tp.get('examples_per_second', 'n/a')} examples/s, "
        f"{tp.get('tokens_per_second', 'n/a')} tokens/s.\n",
    ]


def parameters_section(train):
    p = train["parameters"]
    if p["numel_as_stored"] != p["total"]:
        why = (f"Summing `numel()` over the model's tensors gives {p['numel_as_stored']:,}, fewer than the total, "
               "because bitsandbytes stores 4-bit NF4 weights packed two per byte in uint8 tensors: each quantized "
               "matrix reports half its logical size. The total counts each weight once, from the quantized layers' "
               "original shapes.")
    else:
        why = "No weights are 4-bit packed, so summing `numel()` over the tensors gives the total."
    return [
        "\n## 3. Parameters\n",
        md.table(["total", "trainable (LoRA)", "trainable %", "numel as stored"],
                 [(f"{p['total']:,}", f"{p['trainable']:,}", f"{p['trainable_percent']:.4f}%",
                   f"{p['numel_as_stored']:,}")]),
        why + " Only the LoRA adapter matrices are trained; the base model is frozen. "
        f"Saved adapter: {train['adapter_bytes'] / 2**20:.2f} MB.\n",
    ]


def resources_section(train):
    r = train["resources"]
    reason = r.get("gpu_unavailable_reason")
    lines = [
        "## 4. Resources used by fine-tuning\n",
        f"Sampled {r['samples']} times over {r['wall_seconds']:.1f} s of the fine-tuning process.\n",
        f"- RAM (process RSS): peak {r['process_rss_peak_mb']:.1f} MB, mean {r['process_rss_mean_mb']:.1f} MB.",
        f"- CPU (percent of all cores): mean {r['cpu_percent_mean']}%, peak {r['cpu_percent_peak']}%.",
    ]
    if r.get("gpu_name") is None:
        lines.append(f"- GPU: none used: {reason or 'no reason recorded'}.")
    else:
        def gpu(key, unit):
            # a missing reading is reported as missing, never as zero
            return "not measured" + (f" ({reason})" if reason else "") if r.get(key) is None else f"{r[key]:.1f} {unit}"

        lines += [
            f"- GPU: {r['gpu_name']}.",
            f"  - Memory used on the device: peak {gpu('gpu_memory_used_peak_mb', 'MB')}, "
            f"mean {gpu('gpu_memory_used_mean_mb', 'MB')}.",
            f"  - Memory of this process (NVML): peak {gpu('gpu_process_memory_peak_mb', 'MB')}; "
            f"torch max allocated: {gpu('torch_max_memory_allocated_mb', 'MB')}.",
            f"  - Utilization: mean {gpu('gpu_utilization_mean_percent', '%')}, "
            f"peak {gpu('gpu_utilization_peak_percent', '%')}.",
        ]
    lines.append(f"- Disk: {r['disk_outputs_mb']:.1f} MB of outputs written by fine-tuning.\n")
    return lines


def failures_section(failures):
    c = failures["counts"]
    overall = next(s for s in failures["slices"] if s["slice"] == "all")
    # a slice of 2 pairs swings by 50 points on one pair: only slices large enough to count as evidence are compared
    shifts = sorted((s for s in failures["slices"] if s["slice"] != "all" and s["n"] >= EVIDENCE_MIN_N),
                    key=error_change)
    lines = [
        "## 5. Failure cases\n",
        f"Of {failures['n']} test pairs, fine-tuning corrected {c['corrected']}, left {c['not_corrected']} wrong, "
        f"and broke {c['regressed']} ({c['both_right']} were right for both). Every case, with scores, features and "
        "the selection rule of the shown examples, is in [failure_cases.md](failure_cases.md) and "
        "`reports/failure_cases.json`.\n",
        f"Error rate by slice (overall: baseline {md.pct(overall['baseline_error'])}, "
        f"fine-tuned {md.pct(overall['finetuned_error'])}):\n",
        md.slice_table(failures["slices"]),
    ]
    if shifts:
        def shift(s):
            return (f"{s['slice']} = {s['value']} ({s['n']} pairs, {md.pct(s['baseline_error'])} -> "
                    f"{md.pct(s['finetuned_error'])}, {md.pp(error_change(s))})")

        lines.append(f"Error change by slice ranges from {shift(shifts[0])} to {shift(shifts[-1])}; "
                     f"overall {md.pp(error_change(overall))} (slices of at least {EVIDENCE_MIN_N} pairs; "
                     "small slices carry wide uncertainty).\n")
    top = list(failures["confusion_pairs"]["finetuned"].items())[:3]
    if top:
        lines.append("Most frequent fine-tuned confusions (gold -> predicted): "
                     + ", ".join(f"{k} ({v})" for k, v in top) + ".\n")
    return lines


def calibration_section(base, tuned):
    if not (base.get("calibration") and tuned.get("calibration")):
        return ["\n## 6. Calibration\n", "Not measured: evaluate.method `generate` gives no label scores.\n"]
    rows = []
    for name, m in (("baseline", base), ("fine-tuned", tuned)):
        c = m["calibration"]
        conf = (lambda x: "n/a" if x is None else f"{x:.3f}")
        rows.append((name, c["n"], md.pct(c["ece"]), md.ci(c["ece_ci95"]), conf(c["mean_confidence_right"]),
                     conf(c["mean_confidence_wrong"]), f"{c['temperature']:.3g}", md.pct(c["ece_after_temperature"]),
                     md.ci(c["ece_after_temperature_ci95"])))
    c = tuned["calibration"]
    return [
        "\n## 6. Calibration\n",
        f"Confidence = softmax over the three label log-likelihoods. Expected calibration error (ECE) over "
        f"{c['n_bins']} equal-width confidence bins, with a 95% bootstrap interval over pairs; the temperature is "
        f"fitted on the {c['n_val']} validation pairs (one scalar) and applied to the test pairs, which changes "
        "confidences, never predictions. Reliability diagrams: `dvc plots show` (plots/*/reliability.csv).\n",
        md.table(["model", "n", "ECE", "95% CI", "mean confidence, right", "mean confidence, wrong", "temperature",
                  "ECE after temperature", "95% CI"], rows),
        f"For scale: Desai & Durrett (2020) report 1.93% in-domain ECE on SNLI for fine-tuned RoBERTa-base (0.84% "
        f"after temperature scaling) on ~4,900 pairs; at n = {c['n']} the interval above is "
        f"{100 * (c['ece_ci95'][1] - c['ece_ci95'][0]):.1f} points wide, so only large differences are resolved.\n",
    ]


def probes_section(base, tuned):
    probes = list(dict.fromkeys([*base["probes"], *tuned["probes"]]))
    if not probes:
        return ["\n## 7. Probes\n", "None: evaluate.probes is empty.\n"]

    def cell(m, probe, key, fmt=str):
        value = (m["probes"].get(probe) or {}).get(key)
        return "n/a" if value is None else fmt(value)

    rows = [(probe, cell(tuned, probe, "n"), cell(base, probe, "accuracy", md.pct),
             cell(tuned, probe, "accuracy", md.pct),
             f"{cell(base, probe, 'flipped_when_original_right')} / {cell(base, probe, 'original_right')}",
             f"{cell(tuned, probe, 'flipped_when_original_right')} / {cell(tuned, probe, 'original_right')}")
            for probe in probes]
    return [
        "\n## 7. Probes built from the test pairs\n",
        "hypothesis_only: the premise left out (evaluate.hypothesis_only_template); the others keep the gold label "
        "by construction (qlora_nli/analysis/probes.py cites each rule's source). Flips: pairs the model got right on the "
        "original but wrong on the probe.\n",
        md.table(["probe", "pairs", "baseline accuracy", "fine-tuned accuracy", "baseline flips / right",
                  "fine-tuned flips / right"], rows),
    ]


def sets_section(sets, manifest):
    if not sets:
        return ["\n## 8. Out-of-domain sets\n", "None: data.extra_sets is empty.\n"]
    info = manifest.get("extra_sets", {})
    rows = []
    for name, m in sets.items():
        b, t = m["baseline"], m["finetuned"]
        where = info.get(name, {})
        rows.append((name, f"`{where.get('source', '?')}` {where.get('split', '?')}", t["n"],
                     f"{md.pct(b['accuracy'])} {md.ci(b['accuracy_ci95'])}",
                     f"{md.pct(t['accuracy'])} {md.ci(t['accuracy_ci95'])}", md.pp(t["accuracy"] - b["accuracy"])))
    return [
        "\n## 8. Out-of-domain sets\n",
        "Scored like the test pairs (same prompt, same method), never trained on; evenly spaced samples "
        "(data.extra_sets). Per-set metrics: metrics/sets/<model>/<set>.json.\n",
        md.table(["set", "source and split", "pairs", "baseline (95% CI)", "fine-tuned (95% CI)", "change"], rows),
    ]


def evidence_list(failures, base, tuned, sets):
    """The claims, each with its number and n: the probes' (from failure_cases), calibration's and transfer's."""
    claims = list(failures["evidence"]["claims"])
    for name, m in (("baseline", base), ("fine-tuned", tuned)):
        alone = m["probes"].get(HYPOTHESIS_ONLY)
        if alone and alone.get("accuracy") is not None:
            claims.append(f"From the hypothesis alone the {name} model is right on {md.pct(alone['accuracy'])} of "
                          f"{alone['n']} test pairs (full pairs: {md.pct(m['accuracy'])}; chance is about 33%).")
    if base.get("calibration") and tuned.get("calibration"):
        b, t = base["calibration"], tuned["calibration"]
        claims.append(f"ECE is {md.pct(b['ece'])} for the baseline and {md.pct(t['ece'])} for the fine-tuned model "
                      f"on {t['n']} test pairs; temperature scaling fitted on {t['n_val']} validation pairs gives "
                      f"{md.pct(t['ece_after_temperature'])} for the fine-tuned model.")
    for name, m in sets.items():
        b, t = m["baseline"], m["finetuned"]
        claims.append(f"On {name} ({t['n']} pairs, out of domain) accuracy goes from {md.pct(b['accuracy'])} to "
                      f"{md.pct(t['accuracy'])} ({md.pp(t['accuracy'] - b['accuracy'])}).")
    return ["### What the evidence says\n", *(f"- {claim}" for claim in claims), ""]


def figure(name, caption, shown):
    """The Markdown of one figure of reports/figures/, if it was drawn."""
    return [f"![{caption}](figures/{name})\n"] if name in shown else []


def render(art, drawn):
    """reports/report.md's text from the artifacts `art` (load_inputs) and the figures `drawn` (figures.report_figures)."""
    base, tuned, train, comparison = art["baseline"], art["finetuned"], art["train"], art["comparison"]
    lines = [
        f"# QLoRA fine-tuning of `{train['model']}` on SNLI: report\n",
        "Every number below is read from the pipeline's artifacts (metrics/, reports/failure_cases.json, "
        "data/manifest.json); `dvc repro` regenerates them and this file.\n",
        *data_section(art["manifest"]),
        *method_section(base, tuned, comparison),
        *accuracy_section(base, tuned, comparison),
        *figure("accuracy.svg", "Accuracy with 95% intervals, test pairs and extra sets", drawn),
        *figure("confusion.svg", "Confusion matrices", drawn),
        *time_section(train),
        *figure("training.svg", "Loss and validation accuracy per epoch", drawn),
        *parameters_section(train),
        *resources_section(train),
        *failures_section(art["failures"]),
        *evidence_list(art["failures"], base, tuned, art["sets"]),
        *calibration_section(base, tuned),
        *figure("reliability.svg", "Reliability diagrams before and after temperature scaling", drawn),
        *probes_section(base, tuned),
        *figure("probes.svg", "Right answers that each probe flips", drawn),
        *sets_section(art["sets"], art["manifest"]),
    ]
    return "\n".join(lines)
