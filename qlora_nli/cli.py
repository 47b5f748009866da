"""Command-line entry points: `nli-predict` and `nli-export` (or `python -m qlora_nli.cli predict|export ...`).

Both read the `model` and `prompt` groups of params.yaml (the ones the adapter was trained with) unless an option
overrides them, and end with a one-line message and exit status 1 on a bad file, adapter or param.
"""
import argparse
import json
import sys

import torch

from qlora_nli import threads
from qlora_nli.errors import DataError, RunError, run_stage
from qlora_nli.export import DTYPES, export_merged
from qlora_nli.io import write_jsonl
from qlora_nli.modeling import pick_device
from qlora_nli.params import check_params, load_params
from qlora_nli.predict import check_adapter_dir, load_model, predict_rows, read_pairs


def _params_options(parser):
    parser.add_argument("--params", default="params.yaml", help="params file to read model and prompt from")
    parser.add_argument("--model", help="override model.name (Hub id, local model directory or embedded alias)")


def _params(args, **overrides):
    """params.yaml, checked again after the command-line overrides ("group.key": value; None = not given)."""
    params = load_params(args.params)
    for name, value in {"model.name": args.model, **overrides}.items():
        if value is not None:
            group, key = name.split(".")
            params[group][key] = value
    return check_params(params, f"{args.params} with command-line options")


def predict_main(args):
    params = _params(args, **{"prompt.template": args.template, "model.device": args.device,
                              "model.load_in_4bit": args.load_in_4bit, "evaluate.batch_size": args.batch_size})
    if args.adapter is not None:
        check_adapter_dir(args.adapter)  # before reading stdin, which may take long to end
    if args.premise is not None:
        rows = [{"premise": args.premise, "hypothesis": args.hypothesis}]
    elif args.input not in (None, "-"):
        rows = read_pairs(args.input)
    elif args.input is None and sys.stdin.isatty():
        raise DataError("no pairs given; pass --premise and --hypothesis, --input FILE.jsonl, or pipe JSONL into stdin")
    else:
        rows = read_pairs("<stdin>", sys.stdin.buffer.read())

    threads.configure(params["train"]["num_threads"])
    model, tokenizer = load_model(params["model"], args.adapter, pick_device(params["model"]["device"]))
    batch_size = params["evaluate"]["batch_size"]
    try:
        predictions = predict_rows(model, tokenizer, params["prompt"]["template"], rows, batch_size)
    except torch.OutOfMemoryError:
        raise RunError(f"predict: GPU out of memory; lower --batch-size (now {batch_size})")
    if args.output:
        write_jsonl(args.output, predictions)
    else:
        sys.stdout.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in predictions)


def export_main(args):
    params = _params(args)
    export_merged(params["model"], args.adapter, args.out, args.dtype, args.overwrite)
    print(args.out)


def predict_parser():
    parser = argparse.ArgumentParser(
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
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override model.device")
    parser.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                        help="override model.load_in_4bit")
    parser.add_argument("--batch-size", type=int, help="override evaluate.batch_size")
    return parser


def export_parser():
    parser = argparse.ArgumentParser(
        prog="nli-export", description="Merge a LoRA adapter into its base (loaded without 4-bit quantization) and "
        "save a standalone Hugging Face model directory that loads without peft.")
    parser.add_argument("--adapter", metavar="DIR", required=True, help="LoRA adapter directory (models/adapter)")
    parser.add_argument("--out", metavar="DIR", required=True, help="directory to write the merged model to")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _params_options(parser)
    return parser


def predict(argv=None):
    parser = predict_parser()
    args = parser.parse_args(argv)
    if (args.premise is None) != (args.hypothesis is None):
        parser.error("--premise and --hypothesis go together")
    run_stage(predict_main, args)


def export(argv=None):
    run_stage(export_main, export_parser().parse_args(argv))


if __name__ == "__main__":
    commands = {"predict": predict, "export": export}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python -m qlora_nli.cli {{{','.join(commands)}}} [options]  (--help for each)")
    commands[sys.argv[1]](sys.argv[2:])
