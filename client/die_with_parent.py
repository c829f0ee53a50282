"""`python -m client.die_with_parent PARENT_PID PROGRAM [ARGS...]`: run PROGRAM so that it is
killed when PARENT_PID dies, even by SIGKILL.

Linux's parent-death signal (prctl PR_SET_PDEATHSIG) survives exec, so this sets it and then
becomes the program: the supervisor's children (redis-server included, which cannot watch its
parent itself) never outlive it as orphans holding their ports.
"""

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    parent_pid, program = int(argv[0]), argv[1:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        sys.exit(1)
    os.execvp(program[0], program)


if __name__ == "__main__":
    main(sys.argv[1:])
