"""bench_contention's arithmetic: each side's training rates over the same steps of all its runs (the first step left
out), the faster of repeated runs, and the targets."""
from benchmarks import bench_contention


def run(examples, seconds, pairs_per_second, used=(2,)):
    return {"step_examples": examples, "step_seconds": seconds, "eval_pairs_per_second": pairs_per_second,
            "threads": "t", "threads_used": list(used)}


def test_rates_compare_the_same_steps_and_targets_use_them():
    # idle ran twice (3 steps each), 1 busy stopped after 2 steps: every rate over step 2 alone
    ours = bench_contention.summarize({
        0: [run([16, 16, 8], [9.0, 2.0, 1.0], 8.0), run([16, 16, 8], [9.0, 1.0, 1.0], 6.0)],
        1: [run([16, 16], [9.0, 2.0], 4.8, used=(1,))]})
    assert ours[0]["train_examples_per_second_runs"] == [8.0, 16.0]
    assert ours[0]["train_examples_per_second"] == 16.0 and ours[1]["train_examples_per_second"] == 8.0
    assert ours[0]["scoring_pairs_per_second"] == 8.0 and ours[0]["steps_compared"] == "2-2"
    assert ours[1]["threads_used"] == [1]
    fixed = bench_contention.summarize({0: [run([16, 16], [1.0, 1.0], 10.0)], 1: [run([16, 16], [10.0, 10.0], 1.0)]})
    assert fixed[1]["train_examples_per_second"] == 1.6
    targets = {t["name"]: (t["value"], t["pass"])
               for t in bench_contention.evaluate_targets({"ours": ours, "fixed": fixed})}
    assert targets == {
        "ours training, 1 busy process / idle": (0.5, True),            # 8 / 16
        "ours training idle / fixed 2 threads idle": (1.0, True),       # 16 / 16
        "ours scoring, 1 busy process / idle": (0.6, True),             # 4.8 / 8
        "ours scoring idle / fixed 2 threads idle": (0.8, False),       # 8 / 10
    }


def test_idle_target_is_the_median_of_back_to_back_pairs():
    # three pairs; training over steps 2-3 of each pair: ours 32/2=16 vs fixed 32/2=16 -> 1.0; 32/4=8 vs 32/2=16 -> 0.5
    # (one slow spell); 32/2=16 vs 32/2.5=12.8 -> 1.25. Median 1.0, though the faster-run rule would say 16/16 too and
    # the mean (0.917) would fail.
    pairs = [
        {"ours": run([16, 16, 16], [5.0, 1.0, 1.0], 10.0), "fixed": run([16, 16, 16], [5.0, 1.0, 1.0], 10.0)},
        {"ours": run([16, 16, 16], [5.0, 2.0, 2.0], 5.0), "fixed": run([16, 16, 16], [5.0, 1.0, 1.0], 10.0)},
        {"ours": run([16, 16, 16], [5.0, 1.0, 1.0], 9.0), "fixed": run([16, 16, 16], [5.0, 1.25, 1.25], 10.0)},
    ]
    summary = bench_contention.summarize_pairs(pairs)
    assert summary["train_examples_per_second"] == {"ratios": [1.0, 0.5, 1.25], "median": 1.0}
    assert summary["scoring_pairs_per_second"] == {"ratios": [1.0, 0.5, 0.9], "median": 0.9}
    ours = bench_contention.summarize({0: [run([16, 16], [1.0, 1.0], 1.0)], 1: [run([16, 16], [1.0, 2.0], 1.0)]})
    fixed = bench_contention.summarize({0: [run([16, 16], [1.0, 0.1], 100.0)]})  # ignored: the pairs decide
    targets = {t["name"]: (t["value"], t["pass"])
               for t in bench_contention.evaluate_targets({"ours": ours, "fixed": fixed}, summary)}
    assert targets["ours training idle / fixed 2 threads idle (median pair)"] == (1.0, True)
    assert targets["ours scoring idle / fixed 2 threads idle (median pair)"] == (0.9, False)
