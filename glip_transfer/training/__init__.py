"""Transfer learning and pretraining: modes, data, trainer, checkpoints, artifacts.

``glip_transfer.commands.train`` holds the ``glip finetune`` / ``glip pretrain`` commands;
:func:`glip_transfer.training.artifacts.load_adapter` applies a run's artifact to a base model.
"""

from .config import MODES, LoraSettings, TrainConfig, train_config_for

__all__ = ["MODES", "LoraSettings", "TrainConfig", "train_config_for"]
