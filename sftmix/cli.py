"""`sftmix` command line: `sftmix train --config run.yaml [--any_config_field value ...]`."""

from __future__ import annotations

import argparse
import logging
import sys

COMMANDS = {"train": "train a model with SFTMix or plain NTP (every SFTMixConfig field is a flag)"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = argparse.ArgumentParser(prog="sftmix", description="SFTMix instruction tuning (arXiv 2410.05248)")
        parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v}" for k, v in COMMANDS.items()))
        parser.parse_args(argv[:1])
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    command, rest = argv[0], argv[1:]
    if command == "train":
        return _train(rest)
    return 2


def _train(argv: list[str]) -> int:
    from trl import TrlParser

    from .config import SFTMixConfig
    from .pipeline import train

    (config,) = TrlParser((SFTMixConfig,), prog="sftmix train").parse_args_and_config(argv)
    output_dir = train(config)
    print(f"Model saved to {output_dir}  (AutoModelForCausalLM.from_pretrained({str(output_dir)!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
