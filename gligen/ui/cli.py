"""`gligen ui`: the page that draws layouts, generates, verifies and downloads, on one loaded model.

    gligen ui [--model demo] [--adapter A] [--detector D] [--host 127.0.0.1] [--port 7860]

The model (and the detector) load once, before the page is served; requests wait in Gradio's
queue and run one at a time on them. Without --detector the bundled demo detector serves the
demo model; other models run without verification unless --detector names one.
"""

from __future__ import annotations

import argparse
import os
import socket

from gligen.demo import DEMO
from gligen.devices import DTYPES, parse_device, parse_dtype
from gligen.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ui", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEMO,
                        help="diffusers SD or GLIGEN pipeline directory or hub id (default: demo)")
    parser.add_argument("--adapter", help="adapter directory (adapter.safetensors + adapter_config.json)")
    parser.add_argument("--detector", help="Grounding DINO directory or hub id for verification and photo layouts "
                                           "(default: the demo detector with the demo model, else none)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: fp16 on CUDA, else fp32")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    _check_port(args.host, args.port)  # before minutes of model loading
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry, no version check
    try:
        from gligen.ui.app import Models, serve
    except ImportError as error:
        raise UserError(f"gligen ui needs the ui extra ({error}): pip install \"gligen[ui]\"") from None

    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype or ("fp16" if device.type == "cuda" else "fp32"))
    detector = args.detector or (DEMO if args.model == DEMO else None)
    serve(Models.load(args.model, args.adapter, detector, device, dtype), args.host, args.port)


def _check_port(host: str, port: int) -> None:
    """Raise a UserError unless host:port can be served on now."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise UserError(f"cannot serve on {host}:{port} ({reason}); choose another with --port") from None
