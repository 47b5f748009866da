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
