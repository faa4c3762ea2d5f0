"""How a recipe ends when `accelerate launch` started it in several processes.

`Trainer` joins the process group when it is created but never leaves it, and the recipes write their final files
on the main process only. A rank with nothing left to write then reaches interpreter shutdown while another rank is
still saving, with its gloo threads alive: it intermittently dies with `terminate called without an active
exception` (SIGABRT) and torchrun fails the whole launch (the teardown problem of pytorch/pytorch#179291). Every
recipe therefore ends its `main()` with `end_distributed_training()`: all ranks meet, then each leaves the group.
"""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["end_distributed_training"]


def end_distributed_training() -> None:
    """Wait until every process has reached this point, then destroy the default process group.

    Does nothing in a single process (no process group was created). Call it once, last, in a recipe's `main()`,
    after the main process has written its files: the other ranks wait for it here.

    Example:

    ```python
    >>> trainer.train()
    >>> if trainer.is_world_process_zero():
    ...     tokenizer.save_pretrained(output_dir)
    >>> end_distributed_training()
    ```
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    from accelerate import PartialState

    state = PartialState()  # the state `Trainer`'s accelerator created (a shared singleton)
    state.wait_for_everyone()
    state.destroy_process_group()  # a no-op for `notebook_launcher`'s forked processes, as accelerate intends
