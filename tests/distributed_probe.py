"""Run a recipe as `python distributed_probe.py RECIPE ARGS...` (under `accelerate launch`) and record, per rank, what
its `Trainer`s did: optimizer steps run in this process and a digest of the trainable weights at the end.

Written to `$HFE_PROBE_DIR/rank{RANK}.json` for `test_recipes_distributed.py`. Nothing in the recipe changes.
"""

import hashlib
import json
import os
import runpy
import sys

from transformers import Trainer

_record = {"training_steps": 0}
_train, _training_step = Trainer.train, Trainer.training_step


def _counted_training_step(self, *args, **kwargs):
    _record["training_steps"] += 1
    return _training_step(self, *args, **kwargs)


def _probed_train(self, *args, **kwargs):
    result = _train(self, *args, **kwargs)
    model = self.accelerator.unwrap_model(self.model)
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
    _record.update(digest=digest.hexdigest(), global_step=self.state.global_step, world_size=self.args.world_size)
    path = os.path.join(os.environ["HFE_PROBE_DIR"], f"rank{self.args.process_index}.json")
    with open(path, "w") as file:
        json.dump(_record, file)
    return result


Trainer.training_step, Trainer.train = _counted_training_step, _probed_train
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
