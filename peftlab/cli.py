"""peftlab train | plan | eval | predict | quickstart | merge | publish | serve | convert.

User mistakes (PeftlabError) print one line on stderr and exit 2; anything else is a bug and
keeps its traceback. Heavy imports happen inside the commands so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from pathlib import Path

from peftlab.errors import PeftlabError, RunInterrupted

QUICKSTART_RECIPE = Path(__file__).parent / "quickstart" / "recipe.yaml"


def _quiet_libraries() -> None:
    """Our progress bar and report are the output; silence the libraries' load chatter."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft 0.21 calls a transformers 5 property that warns on every load; nothing to act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    import datasets
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # we report read errors ourselves


def cmd_train(args) -> int:
    from peftlab.config import load_recipe
    from peftlab.train import run
    recipe = load_recipe(args.recipe, args.overrides)
    run(recipe, output_dir=args.output_dir, overwrite=args.overwrite, resume=args.resume)
    return 0


def cmd_plan(args) -> int:
    import torch

    from peftlab.config import load_recipe
    from peftlab.memory import (
        MB,
        PLAN_KINDS,
        format_plan,
        frozen_cache_terms,
        overhead_bytes,
        parse_size,
        plan,
        planned_inputs,
        recommend,
    )
    from peftlab.model_shape import shape_of
    recipe = load_recipe(args.recipe, args.overrides)
    device = args.device or ("cuda" if torch.cuda.is_available() and not recipe.train.cpu
                             else "cpu")
    kinds = args.strategies.split(",") if args.strategies else list(PLAN_KINDS)
    unknown = sorted(set(kinds) - set(PLAN_KINDS))
    if unknown:
        raise PeftlabError(f"--strategies: cannot plan {', '.join(unknown)}; choose from "
                           f"{', '.join(PLAN_KINDS)}")
    budget = parse_size(args.budget) if args.budget else None
    shape = shape_of(recipe)
    overhead = overhead_bytes(recipe, device, shape)
    cache = frozen_cache_terms(recipe, shape, set(kinds) | {recipe.strategy.kind, "head"},
                               device)
    estimates = plan(recipe, device, kinds, shape=shape, overhead=overhead, cache=cache)
    print(f"peak memory on {device}: micro-batch {recipe.train.batch_size} x "
          f"{planned_inputs(recipe, shape)}, checkpointing "
          f"{'on' if recipe.train.gradient_checkpointing else 'off'}, "
          f"optimizer {recipe.train.optimizer}, {shape.total:,} parameters")
    print(format_plan(estimates, budget))
    if budget:
        best = recommend(recipe, shape, budget, overhead, device=device, cache=cache)
        if best is None:
            print(f"nothing fits {args.budget}: try a shorter model.max_length or a smaller "
                  f"model")
        else:
            effective = recipe.train.batch_size * recipe.train.grad_accum
            print(f"recommended within {args.budget}: strategy.kind={best.kind} "
                  f"train.batch_size={best.micro_batch} "
                  f"train.grad_accum={max(effective // best.micro_batch, 1)} "
                  f"train.gradient_checkpointing={str(best.checkpointing).lower()} "
                  f"(~{best.total / MB:,.0f} MB, effective batch {effective} kept)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{**e.__dict__, "total": e.total} for e in estimates], indent=2), encoding="utf-8")
    return 0


def cmd_quickstart(args) -> int:
    from peftlab.config import load_recipe
    from peftlab.train import run
    recipe = load_recipe(QUICKSTART_RECIPE, args.overrides)
    run(recipe, output_dir=args.output_dir or "runs/quickstart", overwrite=args.overwrite)
    return 0


def cmd_eval(args) -> int:
    from accelerate import Accelerator

    from peftlab.artifacts import load_trained
    from peftlab.metrics import format_metrics
    from peftlab.tasks import task_of_run
    model, tokenizer, recipe, info = load_trained(args.run)
    try:
        loaders, evaluate = task_of_run(info).eval_loaders(recipe, tokenizer, info, args.data)
    except PeftlabError as err:
        raise PeftlabError(f"{args.run}: {err}") from None
    # the run's own precision: Accelerate autocasts the forward as it did in training
    accelerator = Accelerator(cpu=recipe.train.cpu, mixed_precision=info["precision"])
    model = accelerator.prepare(model)
    results = {}
    for split, loader in loaders.items():
        results[split] = evaluate(model, accelerator.prepare(loader), accelerator)
        accelerator.print(format_metrics(split, results[split]))
    if args.json and accelerator.is_main_process:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


def cmd_predict(args) -> int:
    from peftlab.artifacts import read_run
    from peftlab.tasks import task_of_run
    if args.file and not args.output:
        raise PeftlabError("predict: --file needs --output out.csv")
    if args.output and Path(args.output).exists() and not args.overwrite:
        raise PeftlabError(f"{args.output}: exists; pass --overwrite to replace it")
    _, info = read_run(args.run)
    task_of_run(info).predict(args, Path(args.run), info)
    return 0


def _write_output(path: str, overwrite: bool, marker: str, what: str, write) -> Path:
    """Write an output folder through `write(folder)`: refused before any work unless it is
    empty or a peftlab output of the same kind that --overwrite may replace, and swapped in
    only once complete, so a failed merge or convert leaves the earlier output whole."""
    from peftlab.run_folder import check_replaceable, is_marked_output, replace_folder
    out = Path(path)
    check_replaceable(out, overwrite, lambda folder: is_marked_output(folder, marker), what)
    replace_folder(out, write)
    return out


def cmd_merge(args) -> int:
    from peftlab.export import merge_run
    from peftlab.run_folder import MERGE_MARKER
    out = _write_output(args.out, args.overwrite, MERGE_MARKER, "merge",
                        lambda folder: merge_run(args.run, folder, args.dtype))
    print(f"wrote the merged model to {out}")
    return 0


def cmd_publish(args) -> int:
    from peftlab.publish import PublishRequest, publish
    request = PublishRequest(Path(args.run), args.repo_id, private=args.private,
                             merged=args.merged, revision=args.revision,
                             dry_run=Path(args.dry_run) if args.dry_run else None)
    where = publish(request, base_model=args.base_model)
    print(f"wrote what would be uploaded to {where}" if args.dry_run else
          f"published {args.run} to {args.repo_id}: {where}")
    return 0


def cmd_serve(args) -> int:
    from peftlab.serve import ServeLimits, serve
    limits = ServeLimits(max_chars=args.max_chars, max_inputs=args.max_inputs,
                         max_image_bytes=args.max_image_bytes,
                         max_new_tokens=args.max_new_tokens, max_batch=args.max_batch,
                         batch_wait_ms=args.batch_wait_ms)
    serve(args.run, args.host, args.port, args.api_key_env, limits)
    return 0


def cmd_convert(args) -> int:
    from peftlab.convert import convert_llama2c
    from peftlab.run_folder import CONVERT_MARKER
    out = _write_output(args.out, args.overwrite, CONVERT_MARKER, "convert",
                        lambda folder: convert_llama2c(args.model, args.tokenizer, folder))
    print(f"wrote a Hugging Face Llama folder to {out}")
    return 0


def build_parser(task_options: bool = True) -> argparse.ArgumentParser:
    """`task_options`: add each task's predict flags, which imports the tasks (seconds);
    parse_args does so only for `predict`, so every other command and --help stay instant."""
    parser = argparse.ArgumentParser(prog="peftlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune from a YAML recipe")
    train.add_argument("recipe", help="recipe YAML file")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    train.add_argument("--output-dir", help="run folder (default: output.dir or runs/<recipe>)")
    train.add_argument("--overwrite", action="store_true", help="replace a non-empty run folder")
    train.add_argument("--resume", nargs="?", const="latest", metavar="latest|CHECKPOINT",
                       help="continue an interrupted run from its newest checkpoint "
                            "(or the given checkpoint folder)")
    train.set_defaults(func=cmd_train)

    planner = sub.add_parser("plan", help="predict peak memory per strategy before a run")
    planner.add_argument("recipe", help="recipe YAML file")
    planner.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=8")
    planner.add_argument("--budget", help="memory to fit in, e.g. 8GiB: adds a recommendation")
    planner.add_argument("--device", choices=["cuda", "cpu"], help="default: where train runs")
    planner.add_argument("--strategies", help="comma list (default: all plannable)")
    planner.add_argument("--json", help="also write the estimates to this JSON file")
    planner.set_defaults(func=cmd_plan)

    quick = sub.add_parser("quickstart", help="LoRA on the packaged MiniLM and demo data")
    quick.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2")
    quick.add_argument("--output-dir", help="run folder (default: runs/quickstart)")
    quick.add_argument("--overwrite", action="store_true", help="replace a non-empty run folder")
    quick.set_defaults(func=cmd_quickstart)

    evaluate = sub.add_parser("eval", help="metrics of a finished run")
    evaluate.add_argument("run", help="run folder")
    evaluate.add_argument("--data", help="labelled file to evaluate (default: the run's "
                                         "validation and test splits)")
    evaluate.add_argument("--json", help="also write the metrics to this JSON file")
    evaluate.set_defaults(func=cmd_eval)

    predict = sub.add_parser("predict", help="label new texts with a finished run")
    predict.add_argument("run", help="run folder")
    predict.add_argument("--file", help="CSV/TSV/JSON(L)/Parquet with the recipe's columns")
    predict.add_argument("--output", help="file to write: the input rows + the predictions")
    predict.add_argument("--overwrite", action="store_true", help="replace --output")
    if task_options:
        _add_task_predict_options(predict, {"--file", "--output", "--overwrite"})
    predict.set_defaults(func=cmd_predict)

    merge = sub.add_parser("merge", help="merge a run's adapter into its base model")
    merge.add_argument("run", help="run folder with adapter/")
    merge.add_argument("out", help="output folder (a plain transformers model)")
    merge.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty folder")
    merge.set_defaults(func=cmd_merge)

    hub = sub.add_parser("publish", help="upload a run (adapter or merged model, card, "
                                         "metrics) to a model hub")
    hub.add_argument("run", help="run folder")
    hub.add_argument("--repo-id", required=True, help="OWNER/NAME of the hub repo")
    hub.add_argument("--private", action="store_true", help="create the repo private")
    hub.add_argument("--merged", action="store_true", help="upload the merged model, not "
                                                          "the adapter")
    hub.add_argument("--revision", help="branch to commit to (created if missing)")
    hub.add_argument("--dry-run", metavar="OUT", help="write the upload to this new folder "
                                                      "instead of sending it")
    hub.add_argument("--base-model", metavar="OWNER/NAME", help="the base model's hub id "
                     "(default: model.hub_id, or model.name when it is one)")
    hub.set_defaults(func=cmd_publish)

    server = sub.add_parser("serve", help="serve a run over HTTP (OpenAI-compatible for "
                                          "causal LMs)")
    server.add_argument("run", help="run folder")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default "
                                                            "loopback only)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--api-key-env", metavar="VAR", help="require 'Authorization: Bearer "
                        "<key>' with the key read from this environment variable")
    server.add_argument("--max-batch", type=int, default=32, help="inputs per forward pass")
    server.add_argument("--max-image-bytes", type=int, default=10 * 2**20,
                        help="image runs: the largest uploaded image (bytes)")
    server.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long a batch waits for more inputs")
    server.add_argument("--max-chars", type=int, default=8192, help="characters per input")
    server.add_argument("--max-inputs", type=int, default=64, help="inputs per request")
    server.add_argument("--max-new-tokens", type=int, default=256,
                        help="causal LM: most tokens a request may generate")
    server.set_defaults(func=cmd_serve)

    convert = sub.add_parser("convert", help="llama2.c checkpoint -> Hugging Face Llama folder")
    convert.add_argument("source_format", choices=["llama2c"], help="checkpoint format")
    convert.add_argument("model", help="llama2.c model .bin (version 0, float32)")
    convert.add_argument("tokenizer", help="llama2.c tokenizer .bin")
    convert.add_argument("out", help="output folder")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty folder")
    convert.set_defaults(func=cmd_convert)
    return parser


def _add_task_predict_options(parser: argparse.ArgumentParser, seen: set[str]) -> None:
    """Each task's own predict flags beside the shared `seen` ones; a flag two tasks share
    (--text) is declared once."""
    from peftlab.tasks import TASKS
    for module in TASKS.values():
        for flags, options in module.PREDICT_OPTIONS:
            if not seen.intersection(flags):
                parser.add_argument(*flags, **options)
                seen.update(flags)


OVERRIDE = re.compile(r"^[A-Za-z_]+\.[A-Za-z_]+=")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Dotted overrides may come anywhere, also after an option
    (`train R --output-dir X train.max_steps=5`), which argparse alone refuses."""
    words = [str(word) for word in (sys.argv[1:] if argv is None else argv)]
    parser = build_parser(task_options=next(
        (word for word in words if not word.startswith("-")), None) == "predict")
    args, extra = parser.parse_known_args(words)
    overrides = [item for item in extra if OVERRIDE.match(item)]
    rest = [item for item in extra if not OVERRIDE.match(item)]
    if rest or overrides and not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(rest or overrides)}")
    if overrides:
        args.overrides = list(args.overrides or []) + overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        _quiet_libraries()
        return args.func(args)
    except PeftlabError as err:
        message = " ".join(str(err).split())
        print(f"peftlab: error: {message}", file=sys.stderr)
        return 2
    except RunInterrupted as stop:
        print(f"peftlab: {stop}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("peftlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
