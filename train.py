"""Train a grounding adapter: `python train.py --config configs/sd14_text_box.yaml [key=value ...]`.

The same command as `gligen train` (see `gligen/training/cli.py`). Runs on one process as it
is, and on several GPUs or nodes under `accelerate launch train.py ...` (FSDP or DeepSpeed
with `--config_file configs/accelerate/*.yaml`). Rerunning the same command resumes from the
latest checkpoint in `output_dir`.
"""

from __future__ import annotations

import argparse
import sys

from gligen.errors import run_cli
from gligen.training.cli import DESCRIPTION, add_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(run_cli(build_parser()))
