#!/usr/bin/env python
"""The only entry point: compose the Hydra config, then run the selected stage.

python run.py model=gpt2-small task=ioi stage=trace task.n_prompts=8
python run.py --cfg job model=gpt2-small task=ioi      # show the composed config
python run.py -m launcher=slurm model=gpt2-small,pythia-160m task=ioi,gt,gp stage=pipeline

A user-fixable failure prints one line ``error: ...`` and exits 2; ``-v`` (or ``HYDRA_FULL_ERROR=1``)
shows its traceback too. Progress bars are drawn only on a terminal (not in logs).
"""

from __future__ import annotations

import gc
import logging
import os
import sys

# Start-up creates hundreds of thousands of long-lived objects (torch, Hydra, the config schema); the
# cyclic garbage collector would scan them all several times while they are made (about 1.2 s of a
# start). Collection resumes, with those objects frozen out of its passes, once the config is read.
if gc.isenabled():
    gc.disable()
if "-v" in sys.argv[1:]:  # ours, not Hydra's: show tracebacks (Hydra's own full-error switch)
    sys.argv.remove("-v")
    os.environ["HYDRA_FULL_ERROR"] = "1"
if not sys.stderr.isatty():  # no line per progress update in log files (read when tqdm is imported)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import hydra  # noqa: E402 - the environment above must be set before tqdm is imported
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from attncomm.errors import AttncommError
from attncomm.runtime.config import AppConfig, register_configs
from attncomm.runtime.registry import run_job

log = logging.getLogger("attncomm")
register_configs()


def _full_errors() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR", "") == "1"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    try:
        try:
            app = OmegaConf.to_object(cfg)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "?"
            what = str(getattr(err, "msg", None) or err).splitlines()[0]
            raise AttncommError(
                f"configuration is incomplete or invalid at {key!r}: {what}; "
                "select it again (e.g. model=toy-ioi, task=ioi) or fix the override"
            ) from err
        assert isinstance(app, AppConfig)
        gc.freeze()
        gc.enable()
        return run_job(app)
    except AttncommError as err:
        log.error("%s", err)
        if _full_errors() or (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
            raise  # multirun: let the launcher record this job as failed and carry on with the others
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    try:
        main()
    finally:
        # Interpreter teardown runs full garbage collections over every object still alive: about
        # 500,000 once torch and transformers are imported, 1.5 to 2.5 s between the last log line and
        # the shell prompt. Frozen objects are left out of those passes. Module teardown still releases
        # them by reference counting and atexit handlers (logging, wandb, temporary directories) still
        # run; only objects left in reference cycles are not finalized (every file a stage writes is
        # closed before it returns).
        gc.freeze()
