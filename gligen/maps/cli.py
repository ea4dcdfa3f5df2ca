"""`gligen condition IMAGE --type canny --out map.png`: a map made from an image (`gligen.maps.extract`)."""

from __future__ import annotations

import argparse

from gligen.commands import positive_int
from gligen.errors import UserError
from gligen.files import OutputFile, open_image, save_image
from gligen.maps import CONDITION_TYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("condition", description=__doc__)
    parser.add_argument("image", help="the image to make the map of")
    parser.add_argument("--type", required=True, choices=CONDITION_TYPES, dest="kind",
                        help="canny (OpenCV), hed (ControlNet's HED network), depth or normal (a transformers depth "
                             "model), sem (a transformers ADE20K segmenter); --model gives the network")
    parser.add_argument("--out", required=True, type=OutputFile, help="the map file to write (.png)")
    add_extractor_options(parser, "--model")
    parser.set_defaults(func=run)


def add_extractor_options(parser: argparse.ArgumentParser, model_flag: str) -> None:
    """The extractor's options, shared by `gligen condition` and the data writers."""
    parser.add_argument(model_flag, dest="condition_model",
                        help="hed: ControlNetHED.pth or its directory (default lllyasviel/Annotators); depth / normal: "
                             "a transformers depth model; sem: a transformers ADE20K segmenter (directory or hub id)")
    parser.add_argument("--canny-low", type=positive_int, default=100, help="Canny's lower threshold (default 100)")
    parser.add_argument("--canny-high", type=positive_int, default=200, help="Canny's upper threshold (default 200)")
    parser.add_argument("--condition-device", default="cpu", help="device of the map's network (default cpu)")


def extractor(kind: str, args: argparse.Namespace):
    from gligen.maps.extract import Extractor

    return Extractor(kind, args.condition_model, args.canny_low, args.canny_high, args.condition_device)


def run(args: argparse.Namespace) -> None:
    image = open_image(args.image)
    save_image(args.out, extractor(args.kind, args)(image))
    print(f"wrote {args.out}")


def fidelity_metrics(present: list, args: argparse.Namespace) -> dict[str, float]:
    """`gligen eval score --condition-fidelity`: condition fidelity of the (record, image path) pairs present."""
    from gligen.maps.fidelity import score_images

    pairs = [(record.layout, path) for record, path in present if record.layout.condition is not None]
    if not pairs:
        raise UserError("--condition-fidelity: no layout with a 'condition' map among the images scored")
    kinds = sorted({layout.condition.type for layout, _ in pairs})
    if len(kinds) > 1:
        raise UserError(f"--condition-fidelity: the layouts mix condition types ({', '.join(kinds)}); score each apart")
    return score_images(pairs, extractor(kinds[0], args))
