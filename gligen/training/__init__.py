"""Training grounding adapters: config, shard dataset, and the engine (`trainer`: the state; `step`, `loop`,
`checkpoint`, `validation`: what is done with it). Entry points: `gligen train`, `train.py`."""

from gligen.training.batch import TrainingBatch
from gligen.training.config import TrainConfig, load_config
from gligen.training.dataset import DataPosition, ShardDataset
from gligen.training.loop import TrainingStopped
from gligen.training.trainer import Trainer, train

__all__ = ["DataPosition", "ShardDataset", "TrainConfig", "Trainer", "TrainingBatch", "TrainingStopped", "load_config",
           "train"]
