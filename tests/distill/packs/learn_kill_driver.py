"""Run ``memstore learn ARGS`` and SIGKILL the process at one moment (fault injection).

    python learn_kill_driver.py WHERE NTH -- ARGS...

WHERE is ``checkpoint`` (inside the NTH checkpoint's transaction, after the pack's row is written
and before it commits) or ``step`` (in the middle of the NTH training step, after its backward).
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    where, nth = sys.argv[1], int(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1 :]
    import memstore_gpt2.packs.learn as learn
    from memstore_torch.optim import RowwiseAdagrad

    calls = [0]

    def kill_on_nth(original):
        def wrapper(*a, **k):
            result = original(*a, **k)
            calls[0] += 1
            if calls[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return wrapper

    if where == "checkpoint":
        learn.write_pack = kill_on_nth(learn.write_pack)
    elif where == "step":
        RowwiseAdagrad.step = kill_on_nth(RowwiseAdagrad.step)
    else:
        raise SystemExit(f"unknown kill point {where!r}")
    from memstore_gpt2.cli import main as cli

    cli(args, standalone_mode=True)


if __name__ == "__main__":
    main()
