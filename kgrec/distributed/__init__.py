"""Running stages beyond one process: Dask (``dask_jobs``) and torch.distributed DDP (``ddp``).

Both engines are optional at import time: nothing here imports ``dask`` or starts a process group until a function
is called, so the single-machine path never pays for them.
"""
from __future__ import annotations
