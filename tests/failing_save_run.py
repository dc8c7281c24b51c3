"""Run a method script on a disk that fills up: `python failing_save_run.py METHOD AFTER args...` lets the first
AFTER torch.save calls through, then each one writes half of its bytes and raises OSError(ENOSPC), as a full
disk does mid-write."""
import errno
import importlib
import io
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
method, after = sys.argv[1], int(sys.argv[2])
real_save, calls = torch.save, [0]


def failing_save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] <= after:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    half = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as file:
            file.write(half)
    else:
        f.write(half)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


torch.save = failing_save
importlib.import_module(method).main(sys.argv[3:])
