"""Transfer learning and pretraining: modes, data, trainer, checkpoints, artifacts.

:data:`MODES` defines every transfer mode; :func:`glip_transfer.training.run.prepare` and
:func:`glip_transfer.training.run.train_run` run one training;
:func:`glip_transfer.training.artifacts.apply_adapter` applies a run's artifact to a base model.
"""

from .config import LoraSettings, TrainConfig
from .modes import MODES, TransferMode, train_config_for

__all__ = ["MODES", "LoraSettings", "TrainConfig", "TransferMode", "train_config_for"]
