"""The search: pycma's ask/tell and its state as data (strategy.py), the torch.distributed
coordinator that keeps every rank busy (coordinator.py), the worker that scores one
candidate on a resident runtime (worker.py), and the cheaper fitness modes: racing
(racing.py), adaptive subsets (subsets.py) and IRT anchors (irt.py). The search writes
to its run directory through the small RunStore interface; it does not import run/."""
