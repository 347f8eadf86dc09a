"""The one typed configuration: its schema (`schema`: a dataclass per section), its loading from YAML
plus dotted overrides (`loading`) and the rules across its fields (`rules`). A leaf of the package:
it imports no engine, data, job or CLI module; the engine's rules are handed to it (`EngineRules`).

    cfg = load_config("configs/quickstart.yaml", ["train.lr=3e-5", "data.dev.de=path/dev.tsv"])
"""

from dualner.config.loading import build_dataclass, config_to_dict, load_config, save_config, set_dotted
from dualner.config.rules import EngineRules, batch_split, check_head, evaluation_head, inferred_stage, validate
from dualner.config.schema import (Config, DataConfig, EvalConfig, LoggingConfig, ModelConfig, ProfileConfig,
                                   RunConfig, Stage2Config, TrainConfig, bounded, freeze, thawed_copy)
from dualner.errors import ConfigError

__all__ = ["Config", "ConfigError", "DataConfig", "EngineRules", "EvalConfig", "LoggingConfig", "ModelConfig",
           "ProfileConfig", "RunConfig", "Stage2Config", "TrainConfig", "batch_split", "bounded", "build_dataclass",
           "check_head", "config_to_dict", "evaluation_head", "freeze", "inferred_stage", "load_config",
           "save_config", "set_dotted", "thawed_copy", "validate"]
