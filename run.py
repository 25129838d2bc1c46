#!/usr/bin/env python
"""The only entry point: compose the Hydra config, then run the selected stage.

python run.py model=gpt2-small task=ioi stage=trace task.n_prompts=8
python run.py --cfg job model=gpt2-small task=ioi      # show the composed config
python run.py -m launcher=slurm model=gpt2-small,pythia-160m task=ioi,gt,gp stage=pipeline
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from attncomm.errors import AttncommError
from attncomm.runtime.config import AppConfig, register_configs
from attncomm.runtime.registry import run_job

log = logging.getLogger("attncomm")
register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    app = OmegaConf.to_object(cfg)
    assert isinstance(app, AppConfig)
    try:
        return run_job(app)
    except AttncommError as err:
        log.error("%s", err)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # let the launcher record this job as failed and carry on with the others
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
