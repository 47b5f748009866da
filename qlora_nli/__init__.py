"""Shared code of the QLoRA-on-SNLI pipeline: each stage script in stages/ imports from here.

Importing the package first silences three messages that every model load printed and that call for no action
(below, each with why it is harmless). Here, because the package is imported before anything imports peft, which
imports bitsandbytes, which prints the first one as it is imported."""
import logging
import warnings

BNB_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_the_bnb_kernel_message(record):
    return not record.getMessage().startswith(BNB_KERNEL_MESSAGE)


def silence_known_harmless_warnings():
    """Each message is matched by its text and its source module only: anything else these libraries say shows."""
    # bitsandbytes, on a CPU with AVX512-BF16, fetches an optional kernel from the Hugging Face Hub as it is imported
    # and, without the `kernels` package (or offline), says to install it. That kernel serves only the bfloat16
    # repacked 4-bit weights, which model.loading.keep_4bit_weights_as_loaded turns off (and model.adapters.load_for_inference
    # dequantizes the weights on CPU): it would never run here, so there is nothing to install.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_bnb_kernel_message)
    # peft reads transformers' deprecated alias `is_gradient_checkpointing` whenever it wraps a model; transformers
    # answers with `is_activation_checkpointing`, the same value. Only peft's code can change the name it reads.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                            module=r"transformers\.modeling_utils")
    # peft checks whether the vocabulary was resized since the base model was saved by reading the base's config.json
    # from base_model_name_or_path; for an adapter saved by model.adapters.save_adapter that is the embedded model's alias
    # (or a Hub id, offline), which it cannot look up, so it assumes "not resized". That is right: the pipeline never
    # adds tokens or resizes embeddings (the pad token is the EOS token), so no embedding weights need saving.
    warnings.filterwarnings("ignore", message=r"Could not find a config file in .* - will assume that the vocabulary "
                                              r"was not modified", category=UserWarning,
                            module=r"peft\.utils\.save_and_load")


silence_known_harmless_warnings()
