"""`gligen` command line: generate, edit, convert, data, eval, train, ui, condition. Each subcommand lives beside its code."""

from __future__ import annotations

from typing import Sequence

from gligen.commands import Command, run_commands

COMMANDS = [
    Command("generate", "generate images from box layouts", "gligen.generate:register"),
    Command("edit", "edit an image by phrase: replace, remove, add or move things", "gligen.edit:register"),
    Command("convert", "official GLIGEN checkpoint or diffusers GLIGEN model -> base + grounding adapter",
            "gligen.convert:register"),
    Command("data", "make training shards", "gligen.data.cli:register"),
    Command("eval", "generate from held-out layouts and score them (AP, layout success)", "gligen.eval.cli:register"),
    Command("train", "train a grounding adapter", "gligen.training.cli:register"),
    Command("ui", "draw layouts, generate and verify in a browser (needs the ui extra)", "gligen.ui.cli:register"),
    Command("condition", "make a condition map (canny, depth, normal) from an image", "gligen.maps.cli:register"),
]


def main(argv: Sequence[str] | None = None) -> int:
    """The exit status: 0; 1 for a user error or a fault; 2 for a usage error; 130 / 143 when interrupted."""
    return run_commands("gligen", __doc__, COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
