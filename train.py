"""Train a grounding adapter: `python train.py --config configs/sd14_text_box.yaml [key=value ...]`.

Runs on one process as it is, and on several GPUs or nodes under `accelerate launch train.py ...`
(DeepSpeed or FSDP through accelerate's own config). Rerunning the same command resumes from
the latest checkpoint in `output_dir`.
"""

from __future__ import annotations

import argparse
import sys

from gligen.errors import run_cli


def _train(args: argparse.Namespace) -> None:
    from gligen.training import Trainer, load_config

    adapter = Trainer(load_config(args.config, args.overrides)).train()
    print(f"adapter saved to {adapter}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML training config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-4")
    parser.set_defaults(func=_train)
    return parser


if __name__ == "__main__":
    sys.exit(run_cli(build_parser()))
