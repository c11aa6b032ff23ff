"""`sftmix` command line. Each command's flags are its config's fields; `--config run.yaml` sets them too.

    sftmix train     --config run.yaml [--field value ...]
    sftmix dynamics  --config run.yaml [--field value ...]
    sftmix run       [--config run.yaml] [--field value ...]      (no arguments: the embedded quick-start)
    sftmix eval      --model DIR --dataset FILE [--prompts FILE] ...
    sftmix compare-splits A/confidence.jsonl B/confidence.jsonl
    sftmix select    --dataset_path data.jsonl --by confidence|variability|length --k N|--fraction F --output x.jsonl
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .distributed import FailedOnMain, is_main, leave, print_on_main, warn_if_launched_as_one

COMMANDS = {
    "train": "train a model with SFTMix or plain NTP",
    "dynamics": "score every example's confidence from a reference run and split the data",
    "run": "the whole recipe: dynamics, SFTMix, NTP baseline, eval, report (resumable)",
    "eval": "held-out NLL, generations (AlpacaEval / MT-Bench formats), confidence spread",
    "compare-splits": "fraction of examples in the same group in two confidence files",
    "select": "write a subset of a dataset by confidence, variability or response length",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = argparse.ArgumentParser(prog="sftmix", description="SFTMix instruction tuning (arXiv 2410.05248)")
        parser.add_argument("command", choices=list(COMMANDS), help="; ".join(f"{k}: {v}" for k, v in COMMANDS.items()))
        parser.parse_args(argv[:1] or ["--help"])
        return 2
    # Under a launcher every rank runs this: warnings once (rank 0's), errors from every rank.
    logging.basicConfig(level=logging.WARNING if is_main() else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    # sftmix's --debug (keep tracebacks) stands alone; `--debug underflow_overflow` is Trainer's option
    own_debug = [index for index, arg in enumerate(argv) if arg == "--debug"
                 and (index + 1 == len(argv) or argv[index + 1].startswith("-"))]
    command, rest = argv[0], [arg for index, arg in enumerate(argv) if index and index not in own_debug]
    warn_if_launched_as_one()
    debug = bool(own_debug) or os.environ.get("SFTMIX_DEBUG") == "1"
    handlers = {"train": _train, "dynamics": _dynamics, "run": _run, "eval": _eval, "compare-splits": _compare_splits,
                "select": _select}
    from .errors import InputError

    succeeded = False
    try:
        status = handlers[command](rest)
        succeeded = True
        return status
    except InputError as err:
        # The user can fix this: one message, no traceback (--debug or SFTMIX_DEBUG=1 shows it).
        if debug:
            raise
        if not getattr(err, "quiet", False):  # quiet: another rank printed the same message
            print(f"sftmix {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"sftmix {command}: interrupted; run the same command again to resume from its newest complete "
              "checkpoint (finished stages and checkpoints are kept)", file=sys.stderr)
        return 130
    except FailedOnMain:
        # Rank 0 failed in work it did for every rank and shows its own traceback; this rank says nothing more.
        if debug:
            raise
        return 1
    finally:
        leave(succeeded)


def _parse(config_class, prog: str, argv: list[str]):
    """The command's config from flags and --config YAML; an unreadable or invalid config is an InputError. (What the
    settings need from the machine and the files is checked at the command's start: `recipes.common.check_at_start`.)"""
    import yaml
    from trl import TrlParser

    from . import settings
    from .errors import InputError

    for arg in argv:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if name in settings.RENAMED:
            raise InputError(f"--{name} is not an option any more: use --{settings.RENAMED[name]}")
    # TRL's parser has --no_gradient_checkpointing (its default is True); sftmix's default is unset (on)
    argv = [item for arg in argv for item in (["--gradient_checkpointing", "false"]
                                             if arg in ("--no_gradient_checkpointing", "--no-gradient-checkpointing")
                                             else [arg])]
    if "--config" in argv[:-1]:
        _check_yaml(argv[argv.index("--config") + 1], config_class)
    parser = TrlParser((config_class,), prog=prog)
    settings.arrange_help(parser, settings.declared_by_sftmix(config_class))
    try:
        (config,) = parser.parse_args_and_config(argv)
    except InputError:
        raise
    except ValueError as err:
        if "Unknown arguments from config file" in str(err):  # TrlParser's message for YAML keys no field takes
            unknown = str(err).split(": ", 1)[1].split(". Please", 1)[0]
            raise InputError(f"the config file has keys that {prog} does not take: {unknown}. `{prog} --help` lists "
                             "them; docs/configuration.md maps `trl sft` options to sftmix") from err
        raise InputError(f"invalid configuration: {err}") from err  # a value Trainer or TRL refuses
    except (OSError, TypeError, yaml.YAMLError) as err:  # a missing or unreadable YAML
        raise InputError(f"invalid configuration: {type(err).__name__}: {err}") from err
    return config


def _unique_key_loader():
    """A YAML SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""
    import yaml

    from .errors import InputError

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            lines = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                if key in lines:
                    raise InputError(f"`{key}` is given twice (lines {lines[key] + 1} and "
                                     f"{key_node.start_mark.line + 1}); keep one")
                lines[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _check_yaml(path: str, config_class) -> None:
    """Refuse, naming the file and key, what TrlParser would take silently: a key given twice, a renamed key, and a
    value of the wrong type (TrlParser makes YAML values argparse defaults, which argparse never converts unless
    they are strings: `max_steps: 1.5` failed deep in training)."""
    import typing

    import yaml

    from . import settings
    from .errors import InputError

    try:
        values = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_unique_key_loader())
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"--config {path}: cannot read it ({type(err).__name__}: {err})") from err
    except yaml.YAMLError as err:
        raise InputError(f"--config {path}: invalid YAML: {' '.join(str(err).split())}") from err
    except InputError as err:
        raise InputError(f"{path}: {err}") from err
    if not isinstance(values, dict):
        raise InputError(f"--config {path}: expected a mapping of option: value, got {type(values).__name__}")
    hints = typing.get_type_hints(config_class)
    for key, value in values.items():
        if key in settings.RENAMED:
            raise InputError(f"{path}: `{key}` is not an option any more: use {settings.RENAMED[key]}")
        expected = _type_error(hints.get(key), value) if key in hints else None
        if expected:
            raise InputError(f"{path}: `{key}: {value!r}` must be {expected}")


def _type_error(hint, value) -> str | None:
    """What `value` (from YAML) should have been for a field typed `hint`, or None when it fits or cannot be told
    (strings are left to argparse, which converts and checks them)."""
    import types
    import typing

    if value is None or isinstance(value, str):
        return None
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if any(option in (str, dict) or typing.get_origin(option) is dict for option in options):
        return None
    lists = [option for option in options if typing.get_origin(option) is list]
    if isinstance(value, list):
        if not lists:
            return None if any(option not in (int, float, bool) for option in options) else _describe(options)
        item = typing.get_args(lists[0])[0] if typing.get_args(lists[0]) else None
        errors = [_type_error(item, element) for element in value]
        return f"a list of which each item is {_describe((item,))}" if any(errors) else None
    if bool in options:
        return None if isinstance(value, bool) else _describe(options)
    if int in options and float not in options:
        return None if isinstance(value, int) and not isinstance(value, bool) else _describe(options)
    if float in options:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else _describe(options)
    return None


def _describe(options) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a number"}
    return " or ".join(names.get(option, getattr(option, "__name__", str(option))) for option in options
                       if option is not type(None))


def _train(argv: list[str]) -> int:
    from .config import SFTMixConfig
    from .recipes.train import train

    output_dir = train(_parse(SFTMixConfig, "sftmix train", argv))
    print_on_main(f"Model saved to {output_dir}  (AutoModelForCausalLM.from_pretrained({str(output_dir)!r}))")
    return 0


def _dynamics(argv: list[str]) -> int:
    from .config import DynamicsConfig
    from .recipes.dynamics import dynamics

    output_dir = dynamics(_parse(DynamicsConfig, "sftmix dynamics", argv))
    print_on_main(f"Confidence split written to {output_dir / 'confidence.jsonl'} "
                  f"(train with: sftmix train --confidence_path {output_dir / 'confidence.jsonl'})")
    return 0


def _run(argv: list[str]) -> int:
    from .config import RunConfig
    from .recipes.run import run

    if not argv:  # the quick start: the shipped config, sized for a 2-core CPU
        argv = ["--config", str(Path(__file__).with_name("quickstart.yaml"))]
    run_dir = run(_parse(RunConfig, "sftmix run", argv))
    print_on_main(f"Report: {run_dir / 'report.md'}  (numbers: {run_dir / 'metrics.json'})")
    return 0


def _eval(argv: list[str]) -> int:
    from .config import EvalConfig
    from .recipes.evaluate import evaluate

    config = _parse(EvalConfig, "sftmix eval", argv)
    evaluate(config)
    print_on_main(f"Metrics: {config.output_dir}/metrics.json")
    return 0


def _compare_splits(argv: list[str]) -> int:
    from .confidence import split_agreement
    from .data import read_groups

    parser = argparse.ArgumentParser(prog="sftmix compare-splits")
    parser.add_argument("first")
    parser.add_argument("second")
    args = parser.parse_args(argv)
    first, second = read_groups(args.first), read_groups(args.second)
    shared = len(first.keys() & second.keys())
    agreement = split_agreement(first, second)
    print(f"split agreement: {agreement:.4f} of the {shared} shared examples in the same group ({args.first}: "
          f"{len(first)} examples, {args.second}: {len(second)})")
    if shared < min(len(first), len(second)):
        print(f"note: only {shared} of the examples are in both files; the rest are not compared", file=sys.stderr)
    return 0


def _select(argv: list[str]) -> int:
    from .config import SelectConfig
    from .selection import select, summary_path

    config = _parse(SelectConfig, "sftmix select", argv)
    summary = select(config)
    low, high = summary["selected_range"]
    print(f"Selected {summary['selected']} of {summary['scored']} scored records by {config.by} ({config.keep}, "
          f"{low:.4g} to {high:.4g}) -> {config.output}  (summary: {summary_path(config.output)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
