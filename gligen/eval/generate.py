"""`gligen eval generate`: one image per layout of an evaluation set, resumable, split across processes.

Image `image_id` is written to `<out>/<image_id:012d>.png`; its seed is derived from the base
seed and the image id alone, so an image does not depend on the batch size, the number of
processes or which images were already done. The layouts, with their seeds, `image_id` and the
dataset's `file_name`, are written to `<out>/layouts.jsonl` beside the images; that file is an
evaluation set `gligen eval score` reads.

Run under `accelerate launch` to split the images over processes (one GPU each). On CPUs,
`accelerate launch --multi_gpu --num_processes N -m gligen.cli eval generate ... --device cpu`
(torchrun, gloo): accelerate's `--cpu` starts several processes only through mpirun.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from tqdm.auto import tqdm

from gligen.devices import launched_processes
from gligen.errors import UserError, progress
from gligen.eval.annotations import Record
from gligen.files import save_image
from gligen.layout import Layout, save_layouts

LAYOUTS_FILE = "layouts.jsonl"

Generator = Callable[..., Any]  # GligenPipeline.__call__(layouts, **kwargs): an output with `.images`


def image_name(image_id: int) -> str:
    """File name of the generated image of `image_id` (zero padded like COCO's)."""
    return f"{image_id:012d}.png"


def layout_seed(base_seed: int, image_id: int) -> int:
    """A 32-bit seed from a hash of (base seed, image id): stable, and unrelated for nearby ids."""
    digest = hashlib.sha256(f"{base_seed}/{image_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seeded_layouts(records: Sequence[Record], base_seed: int) -> list[Layout]:
    """Each record's layout with its derived seed and `image_id` / `file_name` kept in `meta`."""
    return [
        replace(r.layout, seed=layout_seed(base_seed, r.image_id),
                meta={**r.layout.meta, "image_id": r.image_id, "file_name": r.file_name})
        for r in records
    ]


def process_state(device: str | None = None) -> PartialState:
    """This process's place in an `accelerate launch` run (a single process otherwise).

    Processes on the CPU (`accelerate launch --cpu`, or `--device cpu`) join over gloo only when
    PartialState is told `cpu=True`: `Accelerator` reads ACCELERATE_USE_CPU, a bare PartialState does
    not, and each process would then make every image. A launch whose processes still did not join
    is refused for the same reason.
    """
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or device == "cpu")
    launched = launched_processes()
    if launched > 1 and state.num_processes == 1:
        raise UserError(f"{launched} processes were launched but did not join (each would make every image); "
                        "on CPUs pass --device cpu")
    return state


def generate(
    pipeline: Generator,
    records: Sequence[Record],
    out_dir: str | Path,
    base_seed: int = 0,
    batch_size: int = 1,
    state: PartialState | None = None,
    **call_kwargs: Any,
) -> int:
    """Generate the images of `records` not yet in `out_dir`; return how many this process made.

    `call_kwargs` go to the pipeline (num_inference_steps, guidance_scale, schedule, ...).
    """
    state = state or process_state()
    out_dir = Path(out_dir)
    layouts = seeded_layouts(records, base_seed)
    if state.is_main_process:
        save_layouts(out_dir / LAYOUTS_FILE, layouts)
    todo = [lay for lay in layouts if not (out_dir / image_name(lay.meta["image_id"])).is_file()]
    if state.is_main_process and len(todo) < len(layouts):
        done = len(layouts) - len(todo)
        tqdm.write(f"{done} of {len(layouts)} images already done in {out_dir}; skipping them", file=sys.stderr)
    state.wait_for_everyone()  # every process must list the same `todo` before any writes an image
    made = 0
    finished = lambda: f"{len(layouts) - len(todo) + made} of {len(layouts)} images written to {out_dir}"  # noqa: E731
    with state.split_between_processes(todo) as mine, progress(finished), tqdm(
            total=len(mine), desc="generate", unit="image", disable=not state.is_local_main_process) as bar:
        for batch in _batches(mine, batch_size):
            for layout, image in zip(batch, pipeline(batch, **call_kwargs).images):
                save_image(out_dir / image_name(layout.meta["image_id"]), image)
                made += 1
            bar.update(len(batch))
    if state.num_processes > 1:
        tqdm.write(f"process {state.process_index} of {state.num_processes}: made {made} images", file=sys.stderr)
    state.wait_for_everyone()
    return made


def _batches(layouts: Sequence[Layout], batch_size: int) -> Iterator[list[Layout]]:
    for start in range(0, len(layouts), batch_size):
        yield list(layouts[start:start + batch_size])
