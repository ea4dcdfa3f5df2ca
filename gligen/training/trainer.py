"""The state of a training run: a grounding adapter on a frozen Stable Diffusion base (1.x, 2.x, XL), with accelerate.

    adapter_dir = Trainer(load_config("sd14_text_box", ["data.shards=..."])).train()

`Trainer(config)` builds the state; the work is done by functions over it, one concern per
module as in DETR's `engine.py`: `step` (the loss of a batch), `loop` (updates, logs, stops),
`checkpoint` (save and resume), `validation` (grounding gain, grids). Only the adapter trains
(position net, fusers, and in inpainting mode the extra input channels); the base is frozen
and may be cast to bf16/fp16.

Randomness of a step (timesteps, noise, VAE sampling, grounding drop) comes from one
generator per process that is saved in checkpoints, and the data stream is a pure function
of its position (see `dataset.py`): a run stopped and resumed from a checkpoint ends with
the same weights as a run that never stopped.

Output directory:
    checkpoints/checkpoint-00005000/  adapter/ (the adapter to generate with), training state (see `checkpoint.py`)
    adapter/                          the final adapter (`gligen generate --adapter DIR/adapter`)
    validation/step-00005000.png      validation grids
    logs/                             metrics.jsonl, and the files of the trackers in `report_to`
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from gligen.base import FrozenBase
from gligen.devices import launched_processes
from gligen.errors import UserError
from gligen.files import check_writable
from gligen.grounding import GroundingInputs
from gligen.layout import load_layouts
from gligen.training import checkpoint, loop, sharding, step, trackers, validation
from gligen.training.batch import TrainingBatch
from gligen.training.cache import EncodingCache
from gligen.training.config import TrainConfig
from gligen.training.dataset import DataPosition, ShardDataset, check_shards
from gligen.training.model import GroundedUNet, load_base, make_adapter, set_attention
from gligen.training.optim import make_lr_scheduler, make_optimizer

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Trainer:
    """Everything a run holds: config, accelerator, frozen `base`, `adapter` and the wrapped `model`,
    `optimizer`, `lr_scheduler`, `ema`, the step `generator`, the encoding `cache`, and the
    progress a checkpoint saves (`step`, `bad_in_a_row`, data `positions`).

    `base` replaces loading `model.base` (a `FrozenBase` built in memory, as the benchmarks do).
    """

    def __init__(self, config: TrainConfig, base: FrozenBase | None = None):
        self.config = config
        self.output_dir = Path(config.output_dir)
        check_writable(self.output_dir)  # an unwritable output_dir or a wrong data.shards fails before the model loads
        check_shards(config.data)
        # without CUDA, launched processes join (over gloo) only when told that they run on CPUs
        launched = launched_processes()
        self.accelerator = Accelerator(
            cpu=launched > 1 and not torch.cuda.is_available(),
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=trackers.installed_trackers(config.report_to),
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        sharding.setup(self.accelerator, config)
        if launched > 1 and self.accelerator.num_processes == 1:
            raise UserError(f"{launched} processes were launched but did not join (each would train alone and "
                            "write the same checkpoints); check the accelerate launch configuration")
        if self.accelerator.distributed_type == DistributedType.FSDP:
            unsupported = [key for key, value in (("ema_decay", config.ema_decay), ("model.inpaint", config.model.inpaint),
                           ("model.feature_type", config.model.feature_type == "text-image-box")) if value]
            if unsupported:  # each reads adapter tensors outside the wrapped forward, where FSDP keeps them sharded
                raise UserError(f"config key {unsupported[0]}: not supported under FSDP yet (use DDP or DeepSpeed)")
        set_seed(config.seed)  # the fresh adapter's initialisation
        self.weight_dtype = WEIGHT_DTYPES.get(config.mixed_precision, torch.float32)
        self.device = self.accelerator.device
        self.base = (base or load_base(config, self.weight_dtype)).freeze().to(self.device, self.weight_dtype)
        self.prompts = self.base.prompt_encoder()
        self.noise_scheduler = DDPMScheduler.from_config(self.base.scheduler.config)
        self.timesteps = tuple(config.timestep_range or (0, self.noise_scheduler.config.num_train_timesteps))
        if self.timesteps[1] > self.noise_scheduler.config.num_train_timesteps:
            raise UserError(f"config key timestep_range {list(self.timesteps)} ends past the base's "
                            f"{self.noise_scheduler.config.num_train_timesteps} training timesteps")

        self.adapter = make_adapter(config, self.base).to(self.device)
        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            sharding.vector_gates(self.adapter)
        unet = self.base.unet
        model = GroundedUNet(unet, self.adapter)
        set_attention(unet, config.attention)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()  # gradient checkpointing only acts in training mode; SD UNets have no dropout
        self.trainable = [p for p in self.adapter.parameters() if p.requires_grad]
        optimizer = make_optimizer(config.optim, self.adapter)
        # stepped by us once per update (accelerate would step it once per process)
        self.lr_scheduler = make_lr_scheduler(config.optim, optimizer, config.max_steps)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.ema = EMAModel(self.trainable, decay=config.ema_decay) if config.ema_decay else None
        checkpoint.register_hooks(self)

        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.accelerator.process_index)
        self.step = 0
        self.bad_in_a_row = 0
        self.positions: dict[int, DataPosition] = {}
        self.last_save_seconds: float | None = None
        self.cache = None
        if config.cache_dir:
            # the encoders run in weight_dtype: entries made in bf16 must not feed an fp32 run
            namespace = f"{config.model.base}@{config.model.revision}/{self.weight_dtype}"
            # nor projected phrase embeddings (GLIGEN-XL) an unprojected run, whose entries keep their first namespace
            phrases = "phrases/projected" if self.adapter.config.projected_phrases else "phrases"
            self.cache = {kind: EncodingCache(config.cache_dir, f"{namespace}/{name}")
                          for kind, name in (("latents", "latents"), ("text", "text"), ("phrases", phrases))}
        self.metrics_path = self.output_dir / "logs" / "metrics.jsonl"
        # read now, so that a bad layout file fails the run at once rather than at the first validation
        self.validation_layouts = load_layouts(config.validation.layouts) if config.validation.layouts else []
        self.gain_batch = None
        if config.validation.grounding_gain_samples:  # a fixed batch, from another seed than training's
            with_references = self.adapter.config.feature_type == "text-image-box"
            gain_data = ShardDataset(config.data, config.validation.grounding_gain_samples, config.seed + 1,
                                     with_references=with_references, condition=self.adapter.condition_type)
            self.gain_batch = next(iter(gain_data))

    @property
    def parts(self) -> dict[str, Any]:
        """The base's parts by name (`trainer.parts["unet"]`)."""
        return vars(self.base)

    def train(self) -> Path:
        """Train to `max_steps` (resuming from the latest checkpoint); the directory of the exported adapter."""
        return loop.train(self)

    def loss(self, batch: TrainingBatch | Mapping[str, Any], grounding_drop: float | None = None) -> torch.Tensor:
        """The denoising loss of one batch (a scalar): `step.loss`."""
        return step.loss(self, batch, grounding_drop)

    def grounding_inputs(self, batch: TrainingBatch | Mapping[str, Any], grounding_drop: float | None = None
                         ) -> GroundingInputs:
        return step.grounding_inputs(self, batch, grounding_drop)

    def grounding_gain(self) -> dict[str, float]:
        return validation.grounding_gain(self)


def train(config: TrainConfig) -> Path:
    """Train the adapter `config` describes; the directory of the exported adapter."""
    return Trainer(config).train()
