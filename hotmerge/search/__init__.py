"""The search: pycma's ask/tell and its state (strategy.py), the torch.distributed
coordinator that keeps every rank busy (coordinator.py), and the worker that scores one
candidate on a resident runtime (worker.py)."""
