"""Training grounding adapters: config, shard dataset, trainer (see `train.py` at the repository root)."""

from gligen.training.config import TrainConfig, load_config
from gligen.training.dataset import DataPosition, ShardDataset
from gligen.training.trainer import Trainer, TrainingStopped

__all__ = ["DataPosition", "ShardDataset", "TrainConfig", "Trainer", "TrainingStopped", "load_config"]
