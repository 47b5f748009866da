"""Command-line entry points: `nli-predict` and `nli-export` (or `python -m qlora_nli.cli predict|export ...`).

Both read the `model` and `prompt` groups of params.yaml (the ones the adapter was trained with) unless an option
overrides them, and end with a one-line message and exit status 1 on a bad file, adapter or param.
"""
import argparse
import json
import logging
import re
import sys
from pathlib import Path

import torch

from qlora_nli.config import check_params, load_params
from qlora_nli.infer import lm_eval_tasks
from qlora_nli.infer.export import (
    DTYPES,
    EXPORT_WITHOUT_ADAPTER,
    MERGE_INTO,
    check_out_dir,
    export_merged,
)
from qlora_nli.infer.predict import (
    WITHOUT_ADAPTER,
    check_given_pair,
    check_output,
    load_model,
    predict_rows,
    read_pairs,
)
from qlora_nli.model.adapters import check_adapter_dir
from qlora_nli.model.loading import pick_device
from qlora_nli.runtime import threads
from qlora_nli.runtime.errors import ArgumentParser, DataError, NLIError, RunError, run_stage
from qlora_nli.runtime.files import write_jsonl

log = logging.getLogger("nli-export")
DEFAULT_CARD = "reports/model_card.md"  # written by the report stage
DEFAULT_DATA = "data"  # written by the prepare stage


# The command-line option that overrides each param: a message about the param names the option when it was given
OPTIONS = {"model.name": "--model", "prompt.template": "--template", "compute.device": "--device",
           "model.load_in_4bit": "--load-in-4bit", "evaluate.batch_size": "--batch-size"}
_PARAM_IN_MESSAGE = re.compile(r"^params\.yaml (\w+\.\w+)")


def _naming_options(main, args):
    """`main(args)`, with a message of the library about a param ("params.yaml model.name: ...") naming where this
    command took it from: its option if given (--model), else the --params file."""
    try:
        main(args)
    except NLIError as e:
        found = _PARAM_IN_MESSAGE.match(str(e))
        if not found:
            raise
        name = found.group(1)
        given = name in OPTIONS and _given(args, name) is not None
        raise type(e)((OPTIONS[name] if given else f"{args.params} {name}") + str(e)[found.end():]) from None


def _params_options(parser):
    parser.add_argument("--params", default="params.yaml", help="params file to read model and prompt from")
    parser.add_argument("--model", help="override model.name (Hub id, local model directory or embedded alias)")


def _given(args, name):
    """The value of the option (OPTIONS) that overrides param `name` in this command, None if not given or not one of
    its options."""
    return getattr(args, OPTIONS[name][2:].replace("-", "_"), None)


def _params(args):
    """params.yaml, checked again after the command's options that override a param (OPTIONS)."""
    params = load_params(args.params, warn=False)  # the far-off values are told once, after the overrides
    for name in OPTIONS:
        if _given(args, name) is not None:
            group, key = name.split(".")
            params[group][key] = _given(args, name)
    return check_params(params, f"{args.params} with command-line options")


def predict_main(args):
    params = _params(args)
    if args.adapter is not None:
        check_adapter_dir(args.adapter, "--adapter", WITHOUT_ADAPTER)  # before reading stdin, which may take long
    if args.output:
        check_output(args.output)
    if args.premise is not None:
        rows, where = check_given_pair(args.premise, args.hypothesis), ["--premise and --hypothesis"]
    elif args.input not in (None, "-"):
        rows, where = read_pairs(args.input)
    elif args.input is None and sys.stdin.isatty():
        raise DataError("no pairs given; pass --premise and --hypothesis, --input FILE.jsonl, or pipe JSONL into stdin")
    else:
        rows, where = read_pairs("<stdin>", sys.stdin.buffer.read())

    threads.configure(params["compute"]["num_threads"])
    model, tokenizer = load_model(params["model"], args.adapter, pick_device(params["compute"]["device"]))
    batch_size = params["evaluate"]["batch_size"]
    try:
        predictions = predict_rows(model, tokenizer, params["prompt"]["template"], rows, batch_size, where)
    except torch.OutOfMemoryError:
        raise RunError(f"predict: GPU out of memory; lower --batch-size (now {batch_size})")
    if args.output:
        write_jsonl(args.output, predictions)
    else:
        sys.stdout.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in predictions)


def export_main(args):
    params = _params(args)
    check_out_dir(args.out, args.overwrite)  # before the warnings below: a bad option is the one line printed
    if args.adapter is not None:
        check_adapter_dir(args.adapter, "--adapter", EXPORT_WITHOUT_ADAPTER)
    # the defaults are left out with a warning when the pipeline has not written them; a given --card or --data
    # must be usable (export_merged checks them before the merge)
    card = None if args.no_card or args.adapter is None else args.card or DEFAULT_CARD  # a card describes an adapter
    if args.card is None and card is not None and not Path(card).is_file():
        log.warning("no model card in the export: %s does not exist (`dvc repro report` writes it)", card)
        card = None
    sets = lm_eval_tasks.pipeline_sets(args.data or DEFAULT_DATA) if args.lm_eval else {}
    if args.data is None and sets and not sets["test"].is_file():
        log.warning("no lm-eval tasks in the export: %s does not exist (`dvc repro prepare` writes it)", sets["test"])
        sets = {}
    export_merged(params["model"], args.adapter, args.out, args.dtype, args.overwrite, args.merge_into, card,
                  args.gguf, sets, params["prompt"]["template"])
    print(args.out)


def predict_parser():
    parser = ArgumentParser(
        prog="nli-predict", description="Classify premise/hypothesis pairs; one JSON line per pair on stdout: the "
        "input keys plus prediction (label word) and probabilities (softmax of the three label log-likelihoods).")
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--input", metavar="FILE", help="JSONL file of {premise, hypothesis} objects; - = stdin "
                       "(the default when no pair is given)")
    given.add_argument("--premise", help="one pair from the command line (with --hypothesis)")
    parser.add_argument("--hypothesis", help="the hypothesis of --premise")
    parser.add_argument("--adapter", metavar="DIR", help="LoRA adapter directory (models/adapter); "
                        "without it the base model predicts")
    parser.add_argument("--output", metavar="FILE", help="write the JSONL here instead of stdout")
    _params_options(parser)
    parser.add_argument("--template", help="override prompt.template (must match the one the adapter was trained on)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override compute.device")
    parser.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                        help="override model.load_in_4bit")
    parser.add_argument("--batch-size", type=int, help="override evaluate.batch_size")
    return parser


def export_parser():
    parser = ArgumentParser(
        prog="nli-export", description="Merge a LoRA adapter into the weights it was trained against (the "
        "dequantized 4-bit base, for QLoRA) and save a standalone Hugging Face model directory that loads without "
        "peft and predicts what `evaluate` measured; with its model card, lm-eval tasks and optionally GGUF.")
    parser.add_argument("--adapter", metavar="DIR", help="LoRA adapter directory (models/adapter); without it the "
                        "base model is exported as evaluate@baseline scores it (dequantized from 4-bit)")
    parser.add_argument("--out", metavar="DIR", required=True, help="directory to write the merged model to")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the saved weights")
    parser.add_argument("--merge-into", choices=list(MERGE_INTO), default="trained",
                        help="trained (default): the weights the adapter was trained against, so the export predicts "
                        "what evaluate measured; original: the base's unquantized weights (scores lower, "
                        "docs/predict.md)")
    parser.add_argument("--gguf", action="store_true", help="also write the merged model as GGUF (gguf/model.gguf) "
                        "for llama.cpp, Ollama and llm (Llama-architecture models)")
    card = parser.add_mutually_exclusive_group()
    card.add_argument("--card", metavar="FILE", help=f"model card to copy in as README.md, with --adapter (default: "
                      f"{DEFAULT_CARD}, the one the report stage wrote, when it exists)")
    card.add_argument("--no-card", action="store_true", help="write no model card")
    parser.add_argument("--data", metavar="DIR", help=f"the pipeline's data directory, read by the lm-eval tasks "
                        f"written beside the export (default: {DEFAULT_DATA}, when it holds test.jsonl)")
    parser.add_argument("--lm-eval", action=argparse.BooleanOptionalAction, default=True,
                        help="write lm-eval task files for the test pairs and each extra set (lm_eval/)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _params_options(parser)
    return parser


def predict(argv=None):
    parser = predict_parser()
    args = parser.parse_args(argv)
    if (args.premise is None) != (args.hypothesis is None):
        parser.error("--premise and --hypothesis go together")
    run_stage(_naming_options, predict_main, args, name="nli-predict")


def export(argv=None):
    parser = export_parser()
    args = parser.parse_args(argv)
    if args.card is not None and args.adapter is None:
        parser.error("--card: a model card describes an adapter; give --adapter too, or leave --card out")
    if args.data is not None and not args.lm_eval:
        parser.error("--data is read by the lm-eval tasks, which --no-lm-eval leaves out; give one of the two")
    run_stage(_naming_options, export_main, args, name="nli-export")


if __name__ == "__main__":
    commands = {"predict": predict, "export": export}
    parser = ArgumentParser(prog="python -m qlora_nli.cli", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=list(commands), help="nli-predict or nli-export (--help after it: its options)")
    parser.add_argument("options", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    if len(sys.argv) < 2:
        parser.error(f"no command; give one of {', '.join(commands)}")
    given = parser.parse_args()
    commands[given.command](given.options)
