"""bench_train.py's "ours" side, run in its own child process: the `finetune` and `evaluate` code paths of the
package, the run built and trained by the stage's own functions (train.loop.build_training: model, LoRA, optimizer,
schedule, kept frozen-block states; train.loop.train_one_epoch on each epoch's batches by train.batches.epoch_batches):
length-grouped batches with dynamic padding, split into micro-batches by a token budget (train.batches.micro_batches),
the prompts' shared prefix computed once per pass (forward.forward_body), loss on the answer tokens only with logits
computed only there (forward.answer_loss), evaluation by label log-likelihood with the KV-cache trick
(infer.scoring.score_labels). params.yaml lora/train/evaluate values, plus any `--set group.key=value`.
"""
import logging

from common import rss_peak_mb
from flops import model_dims
from train_shared import finish_side, start_side, train_summary

log = logging.getLogger("bench_train")


def child_ours(spec):
    """The finetune + evaluate code paths of the pipeline, timed: the run is built and trained by the stage's own
    functions (train.loop.build_training, train_one_epoch per epoch), without checkpoints or per-epoch validation."""
    from qlora_nli.forward import shared_prefix_length
    from qlora_nli.model import loading
    from qlora_nli.runtime.resources import ResourceMonitor
    from qlora_nli.train.batches import epoch_batches, micro_batches
    from qlora_nli.train.examples import Examples
    from qlora_nli.train.loop import Timer, build_training, train_one_epoch

    params, t = spec["params"], spec["params"]["train"]
    result, tokenizer, train_rows, (_, prompt_ids, answer_ids, lengths), test_rows, test_prompts = start_side(spec)

    with ResourceMonitor() as monitor:
        dtype = loading.pick_compute_dtype("cpu", params["model"]["compute_dtype"])
        # Keeping the frozen blocks' states is part of training (it replaces their forward in every epoch): timed.
        examples = Examples(prompt_ids, answer_ids, tokenizer.pad_token_id)
        setup = build_training(params, "cpu", dtype, examples)
        result["model_dims"] = model_dims(setup.model, setup.base_parameters["total"],
                                           setup.n_parameters["trainable"], params)
        result["optimizer"] = setup.optimizer_name
        result["rss_mb_after_load"] = rss_peak_mb()
        if setup.frozen is not None:
            result["frozen_blocks"] = {"blocks": setup.frozen.start, "positions": setup.frozen.positions}
        losses = []
        log.info("ours: training %d epoch(s)", t["epochs"])
        seconds = {}
        for epoch in range(1, t["epochs"] + 1):  # fit()'s epochs, at most max_batches batches each, no validation
            with Timer() as timer:
                losses.append(train_one_epoch(setup, examples, epoch_batches(lengths, t, epoch)[: spec["max_batches"]],
                                              t, dtype))
            seconds[epoch] = timer.seconds
        train_seconds = sum(seconds.values()) + (setup.frozen.seconds if setup.frozen is not None else 0.0)
        result["rss_mb_peak_after_train"] = rss_peak_mb()
        epochs = [epoch_batches(lengths, t, e)[: spec["max_batches"]] for e in sorted(seconds)]

        # What ran, for the FLOP estimate (train.batches.micro_batches + forward.answer_loss): per micro-batch, the
        # prompts' shared prefix once, then each row's own tokens left-padded to the longest; vocabulary
        # projection at the answer tokens only.
        counts = dict.fromkeys(("examples", "real_tokens", "answer_tokens", "attn_pairs_real", "executed_positions",
                                "lm_head_positions_executed", "attn_pairs_executed"), 0)
        for batches in epochs:
            for batch in batches:
                prefix = shared_prefix_length([prompt_ids[i] for i in batch])
                for part in micro_batches(batch, lengths, prefix, t["micro_batch_tokens"]):
                    shared = shared_prefix_length([prompt_ids[i] for i in part])
                    width = max(lengths[i] for i in part)
                    counts["examples"] += len(part)
                    counts["real_tokens"] += sum(lengths[i] for i in part)
                    counts["answer_tokens"] += sum(len(answer_ids[i]) for i in part)
                    counts["attn_pairs_real"] += sum(lengths[i] * (lengths[i] + 1) // 2 for i in part)
                    counts["executed_positions"] += shared + len(part) * (width - shared)
                    counts["lm_head_positions_executed"] += sum(len(answer_ids[i]) for i in part)
                    counts["attn_pairs_executed"] += shared * shared + len(part) * (width - shared) * width
        counts["lm_head_positions_model"] = counts["answer_tokens"]
        result.update(train_summary(counts, train_seconds, losses, "mean cross-entropy over answer tokens",
                                     t["gradient_checkpointing"]))
        finish_side(result, setup.model, tokenizer, test_prompts, test_rows, params, "score", "generate", spec["cross_eval"],
                monitor)
    return result
