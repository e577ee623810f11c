"""Run one `sae` command in this process and SIGKILL it at the N-th counted event (the crash tests' child).

    python tests/killpoint.py KILL_AT SAVE_MODULE [--steps] [--only COMMAND_MODULE] -- ARGV...

Events are file-system calls (os.rename, replace, unlink, rmdir, mkdir, fsync, open) made while
``SAVE_MODULE.save_sae`` runs, and with ``--steps`` every ``Trainer.step`` in this process too (Ray Train's
workers are processes of their own). The process kills itself at event KILL_AT (0: never) and prints
``events=N`` to stderr after each save, so a caller learns how many points an uninterrupted run has. Counting
events instead of timing them lands every kill inside the sequence under test, whatever the machine's speed.
``--only`` registers just that subcommand module (the others import Ray, MLflow and transformers).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

count, counting, kill_at = 0, False, 0


def tick() -> None:
    global count
    count += 1
    if count == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


def counted(orig):
    def call(*args, **kwargs):
        if counting:
            tick()
        return orig(*args, **kwargs)

    return call


def counting_save(module) -> None:
    save = module.save_sae

    def save_counting(*args, **kwargs):
        global counting
        counting = True
        try:
            return save(*args, **kwargs)
        finally:
            counting = False
            print(f"events={count}", file=sys.stderr)

    module.save_sae = save_counting


def counting_steps() -> None:
    from sae_core.trainer import Trainer

    step = Trainer.step

    def counted_step(self, batch):
        tick()
        return step(self, batch)

    Trainer.step = counted_step


def main() -> int:
    global kill_at
    split = sys.argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("kill_at", type=int)
    parser.add_argument("save_module")
    parser.add_argument("--steps", action="store_true")
    parser.add_argument("--only")
    args, argv = parser.parse_args(sys.argv[1:split]), sys.argv[split + 1 :]
    kill_at = args.kill_at
    for name in ("rename", "replace", "unlink", "rmdir", "mkdir", "fsync", "open"):
        setattr(os, name, counted(getattr(os, name)))
    if args.steps:
        counting_steps()
    counting_save(importlib.import_module(args.save_module))
    from workflows import cli

    return cli.main(argv, modules=None if args.only is None else [args.only])


if __name__ == "__main__":
    sys.exit(main())
