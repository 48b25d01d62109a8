"""The training engine: the loop, mixed precision, checkpoints (safetensors + JSON), logs, resume.

    from advfast.engine import Trainer, build_config
    cfg = build_config("acl", "ds", "digits", overrides=[{"epochs": 2}])
    Trainer(cfg).fit()
"""

from advfast.engine.checkpoint import CheckpointError, latest_valid_checkpoint, load_checkpoint
from advfast.models.export import export_encoder
from advfast.engine.precision import Precision, resolve_precision
from advfast.engine.trainer import Trainer, TrainingDiverged, build_config, load_run_config, method_class

__all__ = ["Trainer", "TrainingDiverged", "build_config", "load_run_config", "method_class", "Precision",
           "resolve_precision", "CheckpointError", "load_checkpoint", "latest_valid_checkpoint", "export_encoder"]
