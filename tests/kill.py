"""Run `answerfirst ARGS` in a subprocess that SIGKILLs itself in the middle of writing a checkpoint.

The kill lands while the optimizer state of the checkpoint whose path contains `kill_at` is half
written: the model's weights are already on disk, the state file is not. accelerate saves through
torch.save, looked up at call time, so wrapping it in the child process is enough.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

KILL_DURING_CHECKPOINT = """
import os, signal, sys, torch
kill_at, real_save = sys.argv[1], torch.save
def save(obj, f, *args, **kwargs):
    if kill_at in str(f) and "optimizer" in str(f):
        with open(f, "wb") as out:
            out.write(b"half an optimizer state")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from answerfirst.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_cli(args: list, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """`answerfirst ARGS` in a fresh process (one thread, like every run it is compared with)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", KILL_DURING_CHECKPOINT, kill_at] if kill_at else [sys.executable, "-m", "answerfirst.cli"]
    return subprocess.run([*command, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
