"""Fault injection for the distillation tests: run ``memstore`` commands, each SIGKILLed at one moment.

    python kill_driver.py SCENARIOS.json

SCENARIOS.json is a list of ``{"where", "when", "nth", "min_steps", "args"}``. The driver imports
torch, transformers and memstore once, then forks one child per scenario (the parent runs no torch
op, so forking is safe); the child patches the chosen call, runs the CLI with ``args`` and kills
itself with SIGKILL ``when`` ("before" / "after") the ``nth`` matching call. Matching calls:

- ``apply_changes``: ``memstore.Collection.apply_changes`` (memory rows reaching the database),
  counted once the run has started at least ``min_steps`` training steps;
- ``install``: ``os.replace`` onto a file named ``checkpoint.pt``, counted likewise;
- ``train_step``: ``Distiller.train_step`` (the ``nth`` step trained);
- ``save_student``: ``memstore_gpt2.student.save_student`` (1st: surgery done, 2nd: run finished).

These are calls any checkpoint design makes, so the same kill points also exercise the code this
replaced. The driver prints one JSON list: each child's exit status (-9 when the kill happened).
"""

from __future__ import annotations

import json
import os
import signal
import sys


def _arm(where: str, when: str, nth: int, min_steps: int) -> None:
    import memstore.collection
    import memstore_gpt2.student
    import memstore_gpt2.trainer

    steps = [0]
    calls = [0]

    def counted(original, match=lambda *a, **k: True, gate=True):
        def wrapper(*args, **kwargs):
            hit = (not gate or steps[0] >= min_steps) and match(*args, **kwargs)
            if hit:
                calls[0] += 1
            if hit and calls[0] == nth and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            if hit and calls[0] == nth and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return wrapper

    train_step = memstore_gpt2.trainer.Distiller.train_step

    def counting_step(self, step):
        steps[0] += 1
        return train_step(self, step)

    if where == "train_step":
        memstore_gpt2.trainer.Distiller.train_step = counted(counting_step, gate=False)
        return
    memstore_gpt2.trainer.Distiller.train_step = counting_step
    if where == "apply_changes":
        cls = memstore.collection.Collection
        cls.apply_changes = counted(cls.apply_changes)
    elif where == "install":
        os.replace = counted(
            os.replace, match=lambda src, dst: os.path.basename(dst) == "checkpoint.pt"
        )
    elif where == "save_student":
        module = memstore_gpt2.student
        module.save_student = counted(module.save_student, gate=False)
    else:
        raise SystemExit(f"unknown kill point {where!r}")


def main() -> None:
    scenarios = json.loads(open(sys.argv[1]).read())
    # Everything the children need is imported once, here, before forking (no torch op runs).
    import torch.utils.tensorboard  # noqa: F401
    import tqdm.auto  # noqa: F401
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: F401

    import memstore_gpt2.cli
    import memstore_gpt2.distill  # noqa: F401
    import memstore_gpt2.student  # noqa: F401
    import memstore_gpt2.teacher  # noqa: F401
    import memstore_gpt2.trainer  # noqa: F401
    import memstore_torch  # noqa: F401

    statuses = []
    for scenario in scenarios:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _arm(scenario["where"], scenario["when"], scenario["nth"], scenario["min_steps"])
                memstore_gpt2.cli.main(scenario["args"], standalone_mode=False)
            except BaseException as exc:  # noqa: BLE001 - reported through the exit status
                print(f"child error: {exc!r}", file=sys.stderr)
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        statuses.append(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    print(json.dumps(statuses))


if __name__ == "__main__":
    main()
