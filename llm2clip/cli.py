"""`llm2clip` command line. Every subcommand takes `--config FILE` and repeatable `--set key=value`.

    llm2clip data synth   --out DIR --num-images N --seed S   generate the shapes world
    llm2clip data inspect [PATH] [--strict]                   read a dataset, report what was skipped
    llm2clip stage1 pretrain-lm | mntp | cc | eval-cra | merge | all   LLM -> caption embedder
    llm2clip cache build | verify                             embed every caption once / check the cache
    llm2clip stage2 pretrain-clip | finetune-clip | train | eval | all
    llm2clip run [--force]                                    the main job, end to end
    llm2clip export                                           vision tower + whole model
    llm2clip eval --model F --dataset NAME --data-root PATH   standard benchmarks (docs/EVALUATION.md)
    llm2clip convert released SRC --out DIR [--vision-out DIR] import a microsoft/LLM2CLIP-Openai-* folder
    llm2clip ablate online                                    cached vs live LLM embeddings
    llm2clip config show | keys                               print the resolved config / every key
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .errors import Llm2ClipError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML preset, e.g. configs/tiny.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set synth.num_images=200 (repeatable)")


def _load(args: argparse.Namespace, extra: Sequence[str] = ()):
    from .config import load_config

    return load_config(args.config, [*args.overrides, *extra])


def _cmd_synth(args: argparse.Namespace) -> int:
    from .data.synth import synthesize

    extra = [f"synth.{k}={v}" for k, v in (("num_images", args.num_images), ("seed", args.seed),
                                           ("image_size", args.image_size)) if v is not None]
    cfg = _load(args, extra)
    out = args.out or f"{cfg.run.out_dir}/data"
    start = time.perf_counter()
    manifest = synthesize(cfg.synth, out, overwrite=args.overwrite, progress=not args.no_progress)
    splits = ", ".join(f"{k} {v}" for k, v in manifest["splits"].items())
    print(f"shapes world in {out}: {splits} images ({time.perf_counter() - start:.1f} s)")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .data.readers import CaptionReader

    extra = [f"data.path={args.path}"] if args.path else []
    extra += ["data.strict=true"] if args.strict else []
    # a path given here is not data.path: the config's data.format describes that one, so detect this one's
    extra += [f"data.format={args.format or 'auto'}"] if args.format or args.path else []
    cfg = _load(args, extra)
    reader = CaptionReader(cfg.data)
    n_long = sum(len(s.long_captions) for s in reader)
    print(f"{cfg.data.path} ({reader.format}): {reader.stats.summary()}; {n_long} long captions")
    if reader.stats.read == 0:
        print("error: no usable sample; check data.path and the caption/image column names", file=sys.stderr)
        return 1
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from .config import all_keys, to_yaml

    if args.what == "keys":
        print("\n".join(all_keys()))
    else:
        print(to_yaml(_load(args)).rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm2clip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # The deepspeed launcher passes --local_rank=N before the subcommand; the rank is read from the env.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    groups = parser.add_subparsers(dest="group", required=True)

    data = groups.add_parser("data", help="generate and read datasets").add_subparsers(dest="cmd", required=True)
    synth = data.add_parser("synth", help="generate the shapes world")
    _add_config_args(synth)
    synth.add_argument("--out", help="output folder (default: <run.out_dir>/data)")
    synth.add_argument("--num-images", type=int)
    synth.add_argument("--seed", type=int)
    synth.add_argument("--image-size", type=int)
    synth.add_argument("--overwrite", action="store_true", help="replace a dataset built with other settings")
    synth.add_argument("--no-progress", action="store_true")
    synth.set_defaults(func=_cmd_synth)

    inspect = data.add_parser("inspect", help="read every sample and report skips")
    _add_config_args(inspect)
    inspect.add_argument("path", nargs="?", help="overrides data.path")
    inspect.add_argument("--format", help="overrides data.format")
    inspect.add_argument("--strict", action="store_true", help="stop at the first bad sample")
    inspect.set_defaults(func=_cmd_inspect)

    from .convert import add_parser as add_convert
    from .evaluation.cli import add_parser as add_eval
    from .knowledge.cli import add_parsers as add_knowledge
    from .stage1.cli import add_parser as add_stage1
    from .stage2.cli import add_parsers as add_stage2

    add_stage1(groups, _add_config_args)
    add_stage2(groups, _add_config_args)
    add_knowledge(groups, _add_config_args)
    add_convert(groups)
    add_eval(groups)

    config = groups.add_parser("config", help="show the resolved config or list its keys")
    config.add_argument("what", choices=("show", "keys"))
    _add_config_args(config)
    config.set_defaults(func=_cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .distributed import shutdown

    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        shutdown()
        return code
    except (Llm2ClipError, FileExistsError) as e:  # expected, actionable: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
