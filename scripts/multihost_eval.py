#!/usr/bin/env python
"""Kept for old command lines: `dn2 eval` itself runs across processes and hosts now.

  python scripts/multihost_eval.py ARGS  ==  dn2 eval ARGS   (--single is accepted and ignored; --out defaults
                                                             to runs/multihost_eval as before)

Run the same command in every process, e.g. `dn2 eval --coordinator HOST0:1234 --num-processes 2 --process-id {0,1}
...`, or with none of these three flags on Slurm / Open MPI / Cloud TPU (see dn2_jax/distributed.py).
"""

import sys

from dn2_jax.cli import main

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--single"]
    out = [] if any(a.startswith("--out") for a in args) else ["--out", "runs/multihost_eval"]
    sys.exit(main(["eval", *args, *out]))
