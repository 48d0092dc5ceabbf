"""``python die_in_checkpoint_write.py <hydra overrides>``: ``python -m acestep_train`` that SIGKILLs itself inside
its N-th checkpoint write (N = ``$ACESTEP_TEST_DIE_AT_WRITE``; unset or 0: a plain run).

"Inside the write" is made exact instead of hoped for: the N-th time a ``*.ckpt`` is about to be moved into place
(the atomic rename every checkpoint write ends with), the source file is cut to half its length — the bytes a
write in progress would have left — and the process kills itself with SIGKILL before the rename. Nothing can run
after that (no handler, no flush, no ``finally``), exactly like ``kill -9`` from outside at that instant.
"""

import os
import signal
import sys

DIE_AT = int(os.environ.get("ACESTEP_TEST_DIE_AT_WRITE") or 0)
_writes = 0
_replace = os.replace


def _replace_or_die(src, dst, *args, **kwargs):
    global _writes
    if str(dst).endswith(".ckpt"):
        _writes += 1
        if _writes == DIE_AT:
            size = os.path.getsize(src)
            with open(src, "r+b") as f:
                f.truncate(size // 2)
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst, *args, **kwargs)


if DIE_AT:
    os.replace = _replace_or_die

if __name__ == "__main__":
    from acestep_train.training.train import main

    main()
