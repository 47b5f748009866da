"""FLOP accounting of bench_train.py's training sides: the model's sizes (`model_dims`, measured in each child) and
the three FLOP totals (`flops`, computed in the parent against the matmul peak).

FLOP estimate (forward + backward of a frozen base with LoRA adapters; elementwise work, norms, softmax and the
4-bit dequantization are not counted):
  N      = dense weights of the non-embedding linear layers (q, k, v, o, gate, up, down of every block;
           logical in*out of each Linear4bit, counted on the loaded model)
  N_lora = trainable LoRA weights = sum over adapted layers of r * (in + out)
  B      = fraction of the blocks that backward runs through: from the lowest adapted block up (lora.layers),
           all of them under gradient checkpointing
  per token through the blocks:   2N (forward) + 2N * B (backward, input gradients only: the base is frozen)
                                  + 6 N_lora (forward, input gradients and weight gradients of the adapters)
  attention scores, per sequence: 4 * (1 + 2B) * layers * (heads * head_dim) * pairs, pairs = L(L+1)/2 causal
                                  pairs of the L real tokens (for "executed": W*W of the padded width W, a mask is
                                  passed)
  vocabulary projection:          4 * vocab * hidden per position where logits are computed (forward + input grad)
  Three totals, each divided by the training seconds:
    useful   the task's work, same definition both sides: blocks + attention on real tokens, vocabulary projection
             at the answer tokens only (so useful FLOP/s ratio = real tokens/s ratio, and % of peak says how far
             from the hardware the task is done)
    model    each recipe's own objective on real tokens: ours = useful; naive projects every real position but
             the last (L - 1 per example), as its loss over all tokens requires
    executed what actually ran, padding included: ours the prompts' shared prefix once per micro-batch plus each
             row's own tokens padded to the micro-batch's longest, logits at the answer tokens only (so ours'
             executed can be below useful: the useful count charges the template's fixed prefix to every
             example); naive every position of the fixed length; with gradient checkpointing the blocks'
             forward again (2N + 2N_lora per position). Ours keeps the states entering the first adapted block
             (training.FrozenBlockStates, timed as part of training): the frozen blocks' forward is counted once
             per position of that pass, not per epoch (their attention there is not counted)
"""
from common import MATMUL_REPS, MATMUL_SIZE

FLOPS_FORMULA = {
    "N": "dense weights of the non-embedding linear layers (logical in*out, q/k/v/o/gate/up/down of every block)",
    "N_lora": "trainable LoRA weights, sum of r*(in+out) over adapted layers",
    "B": "fraction of the blocks backward runs through (lowest adapted block up; all under gradient checkpointing)",
    "per_token_blocks": "2N forward + 2N*B backward (input grads only, frozen base) + 6 N_lora",
    "attention_per_sequence": "4 * (1 + 2B) * layers * heads * head_dim * pairs; pairs = L(L+1)/2 (real, causal) "
                              "or W*W (executed, padded width W with a mask)",
    "vocab_projection_per_position": "4 * vocab * hidden (forward + input grad of the frozen tied lm_head)",
    "useful": "blocks + attention on real tokens + projection at answer tokens only (same both sides)",
    "model": "blocks + attention on real tokens + projection where the side's own loss needs it "
             "(ours: answer tokens; naive: L-1 positions per example)",
    "executed": "blocks + attention + projection on every position computed, padding included "
                "(+ 2N + 2N_lora per position recomputed under gradient checkpointing; attention recompute not "
                "counted); ours' frozen blocks (below the first adapted one) counted once per position of the "
                "pass that keeps their states, not per epoch (their attention there not counted)",
    "peak": f"best of {MATMUL_REPS} fp32 torch.mm {MATMUL_SIZE}x{MATMUL_SIZE}, 2*n^3 FLOPs each, same threads",
}


def per_unit(d):
    """(backward fraction B, FLOPs per real token through the blocks, per attention pair, per logit position)."""
    backward = d["n_backward_layers"] / d["n_layers"]
    blocks = (2 + 2 * backward) * d["n_body_linear"] + 6 * d["n_lora"]
    attention = 4 * (1 + 2 * backward) * d["n_layers"] * d["d_attn"]
    return backward, blocks, attention, 4 * d["lm_head"]


def useful_total(d, c):
    """The useful FLOPs of the module docstring for the counts `c` (real_tokens, attn_pairs_real, answer_tokens)."""
    _, blocks, attention, vocab = per_unit(d)
    return blocks * c["real_tokens"] + attention * c["attn_pairs_real"] + vocab * c["answer_tokens"]


def flops(side, peak_flops):
    """The three FLOP totals of the module docstring, as FLOP/s and % of the matmul peak."""
    d, c = side["model_dims"], side["counts"]
    backward, blocks, attention, vocab = per_unit(d)
    # Ours with train.states.FrozenBlockStates: the frozen blocks' forward ran once per example, not in every epoch.
    kept = side.get("frozen_blocks") or {"blocks": 0, "positions": 0}
    kept_forward = 2 * d["n_body_linear"] * kept["blocks"] / d["n_layers"]
    kept_attention = 4 * kept["blocks"] * d["d_attn"]
    # Gradient checkpointing runs the blocks' forward twice: work that executes but is not useful.
    recompute = (2 * d["n_body_linear"] + 2 * d["n_lora"]) if side["gradient_checkpointing"] else 0
    totals = {
        "useful": useful_total(d, c),
        "model": blocks * c["real_tokens"] + attention * c["attn_pairs_real"] + vocab * c["lm_head_positions_model"],
        "executed": ((blocks + recompute - kept_forward) * c["executed_positions"] + kept_forward * kept["positions"]
                     + (attention - kept_attention) * c["attn_pairs_executed"]
                     + vocab * c["lm_head_positions_executed"]),
    }
    out = {"backward_fraction": backward, "per_real_token_blocks": blocks, "per_logit_position": vocab, "attention_per_pair": attention}
    for name, total in totals.items():
        rate = total / side["train_seconds"]
        out[name] = {"total_flops": total, "flops_per_second": round(rate),
                     "percent_of_peak": round(100 * rate / peak_flops, 2) if peak_flops else None}
    return out


def model_dims(model, parameters_total, n_lora, params):
    """The sizes the FLOP estimate needs, from the model with its adapters attached."""
    import torch

    from qlora_nli.train.states import first_trainable_block

    head = model.get_output_embeddings()
    cfg = model.config
    # Linear4bit keeps the logical in/out features; lm_head (tied to the embeddings) is counted apart and the
    # adapters' own Linear layers (lora_A, lora_B) are LoRA weights, not the base's
    base_linear = [m for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head and "lora_" not in name]
    # Backward runs from the top down to the lowest adapted block (to the embeddings under gradient checkpointing,
    # where peft makes the embeddings' output require gradients).
    lowest = 0 if params["train"]["gradient_checkpointing"] else first_trainable_block(model)
    return {
        "n_body_linear": sum(m.in_features * m.out_features for m in base_linear),
        "lm_head": head.in_features * head.out_features,
        "n_layers": cfg.num_hidden_layers,
        "d_attn": cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
        "parameters_total": parameters_total,
        "n_lora": n_lora,
        "lora_target_modules": sorted(getattr(model.peft_config["default"], "target_modules", None) or []),
        "n_backward_layers": cfg.num_hidden_layers - lowest,
    }
