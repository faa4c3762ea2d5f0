"""Runnable training recipes (Trainer / TRL); each works under `accelerate launch`."""
