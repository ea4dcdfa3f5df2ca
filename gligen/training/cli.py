"""`gligen train --config NAME_OR_PATH [key=value ...]` (and `python train.py ...`, the same command)."""

from __future__ import annotations

import argparse

DESCRIPTION = """Train a grounding adapter on a frozen Stable Diffusion base.

--config is a YAML file or the name of a config shipped with gligen (sd14_text_box,
sd14_text_image_box, sd14_inpaint_text_box, sdxl_text_box, demo_shapes, tiny_test); any key
can be overridden as key=value (e.g. data.shards='shards/{000000..000099}.tar' optim.lr=1e-4).
Rerunning the same command resumes from the latest checkpoint in output_dir; Ctrl-C or
SIGTERM saves one first. Several GPUs or nodes: `accelerate launch [--config_file
configs/accelerate/fsdp.yaml] train.py --config ...` (or `-m gligen.cli train ...`).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="NAME_OR_PATH",
                        help="a YAML training config, or the name of a shipped one (e.g. sd14_text_box)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="resume from checkpoint state files that need code to load (only files you trust)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-4")
    parser.set_defaults(func=run)


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a grounding adapter", description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)


def run(args: argparse.Namespace) -> None:
    from gligen.training import load_config, train

    overrides = [*args.overrides, *(["trust_pickle=true"] if args.trust_pickle else [])]
    adapter = train(load_config(args.config, overrides))
    print(f"adapter saved to {adapter}")
