"""Run a recipe as `python distributed_probe.py RECIPE ARGS...` (under `accelerate launch`) and record, per rank, what
its `Trainer`s did: optimizer steps run in this process, the distributed type, and a digest of the trainable weights
at the end.

Written to `$HFE_PROBE_DIR/rank{RANK}.json` for `test_recipes_distributed.py`. Nothing in the recipe changes. With
`HFE_PROBE_PAUSE_AT=N`, each rank writes `$HFE_PROBE_DIR/paused{RANK}` (its pid) once the checkpoint of step `N` is
saved and then sleeps, so that the test can kill the launch mid-training at a known point.
"""

import hashlib
import json
import os
import runpy
import sys
import time
from pathlib import Path

from transformers import Trainer

_record = {"training_steps": 0}
_train, _training_step, _save_checkpoint = Trainer.train, Trainer.training_step, Trainer._save_checkpoint
_pause_at = int(os.environ.get("HFE_PROBE_PAUSE_AT", 0))


def _counted_training_step(self, *args, **kwargs):
    _record["training_steps"] += 1
    return _training_step(self, *args, **kwargs)


def _pausing_save_checkpoint(self, *args, **kwargs):
    _save_checkpoint(self, *args, **kwargs)
    if self.state.global_step == _pause_at:
        Path(os.environ["HFE_PROBE_DIR"], f"paused{self.args.process_index}").write_text(str(os.getpid()))
        while True:  # until the test kills the launch
            time.sleep(1)


def _probed_train(self, *args, **kwargs):
    result = _train(self, *args, **kwargs)
    model = self.accelerator.unwrap_model(self.model)
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
    _record.update(digest=digest.hexdigest(), global_step=self.state.global_step, world_size=self.args.world_size)
    _record["distributed_type"] = self.accelerator.distributed_type.value
    path = os.path.join(os.environ["HFE_PROBE_DIR"], f"rank{self.args.process_index}.json")
    with open(path, "w") as file:
        json.dump(_record, file)
    return result


Trainer.training_step, Trainer.train, Trainer._save_checkpoint = (
    _counted_training_step,
    _probed_train,
    _pausing_save_checkpoint,
)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
