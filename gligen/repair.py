"""Self-repairing generation (`gligen generate --repair N`): verify, repaint what failed, verify again.

Round 0 is the image as generated (after --best-of's choice), checked by the detector. Each round
r = 1 .. N starts from the best image so far and repaints the boxes of its failed entities by grounded
inpainting: the layout given to the painter holds only those entities, with the whole layout's prompt and
size, and the seed of round 0 plus r (so every round draws new noise, and a rerun draws the same).
The region repainted is those entities' masks, or their boxes where they have none; every pixel
farther than --feather from it keeps the image's value exactly (`keep_outside`; the region itself is
repainted by latent blending, or with the masked image by a 9-channel inpainting UNet). The result is
verified against the whole layout. Rounds stop early once the best image has no failed entity.

The image kept is the best of all rounds as --best-of ranks candidates (`gligen.generate.best`: instance
success rate, then mean IoU, the earliest of equals), so it never scores below round 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from gligen.generate import Candidate, best, paint


@dataclass
class RepairRound:
    """One round: its image as a `Candidate` of the whole layout (verified, with the UNet calls it took), the seed
    it was drawn with, the entities it repainted (indices into the layout; none in round 0) and the round whose
    image it repainted (None in round 0)."""

    candidate: Candidate
    seed: int
    repainted: tuple[int, ...] = ()
    source: int | None = None

    def to_dict(self, index: int) -> dict[str, Any]:
        return {"round": index, "seed": self.seed, "repainted": list(self.repainted), "source": self.source,
                "unet_calls": self.candidate.unet_calls, **self.candidate.verification.to_dict()}


@dataclass
class Repair:
    """The rounds of one image; round 0 is the image as generated."""

    rounds: list[RepairRound]

    @property
    def kept(self) -> int:
        """The best round (the earliest of equals)."""
        return best([r.candidate for r in self.rounds])

    @property
    def failed(self) -> tuple[int, ...]:
        """The entities that fail in the kept round's image (indices into the layout)."""
        return tuple(i for i, check in enumerate(self.rounds[self.kept].candidate.verification.entities)
                     if not check.success)

    @property
    def unet_calls(self) -> int:
        """The UNet calls the repaints took (round 0's generation not included)."""
        return sum(r.candidate.unet_calls for r in self.rounds[1:])

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "unet_calls": self.unet_calls,
                "rounds": [r.to_dict(index) for index, r in enumerate(self.rounds)]}


def repair(painter, detector, candidates: Sequence[Candidate], rounds: int, call: dict,
           iou_threshold: float = 0.5) -> list[Repair]:
    """Repair verified `candidates` (one per layout, all of one size) in up to `rounds` rounds (see the module).

    `painter` is the pipeline that repaints (the generating one, or a --repair-model); `call` the keyword
    arguments of its calls (steps, guidance, schedule, feather, ...: those of generation; the image, the region
    and keep_outside are the repair's own); `detector` verifies every round's images.
    Returns one `Repair` per candidate; `Repair.rounds[Repair.kept].candidate` is the image to keep.
    """
    from detector.verify import verify_batch

    repairs = [Repair([RepairRound(candidate, candidate.layout.seed)]) for candidate in candidates]
    for index in range(1, rounds + 1):
        todo = [r for r in repairs if r.failed]
        if not todo:
            break
        sources = [r.kept for r in todo]
        starts = [r.rounds[source].candidate for r, source in zip(todo, sources)]
        failed = [r.failed for r in todo]
        seeds = [r.rounds[0].seed + index for r in todo]
        layouts = [replace(start.layout, entities=tuple(start.layout.entities[i] for i in entities), seed=seed)
                   for start, entities, seed in zip(starts, failed, seeds)]
        repaint = {**call, "inpaint_image": [start.image for start in starts], "inpaint_mask": None, "keep_outside": True}
        images, calls = paint(painter, layouts, repaint)
        checks = verify_batch(detector, images, [start.layout for start in starts], iou_threshold)
        for r, start, image, check, seed, entities, source in zip(todo, starts, images, checks, seeds, failed, sources):
            repainted = replace(start, image=image, verification=check, unet_calls=calls)
            r.rounds.append(RepairRound(repainted, seed, entities, source))
    return repairs
