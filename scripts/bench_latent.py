#!/usr/bin/env python
"""Speed benchmark of the latent-space methods (`vlmtta bench-speed` with sts/adte/zero/mta registered).

Until vlmtta/methods/__init__.py imports them, importing the modules here registers them.

Example (the issue's setting):
    python scripts/bench_latent.py --model ViT-B-16 --pretrained none --n-views 64 --n-classes 1000 \
        --methods zeroshot,sts,zero,mta,adte --repeats 3 --output results/speed_latent_vitb16.json
"""
import sys

import vlmtta.methods.adte  # noqa: F401  (registers te, adte)
import vlmtta.methods.mta  # noqa: F401  (registers mta)
import vlmtta.methods.sts  # noqa: F401  (registers sts, sts_ensemble)
import vlmtta.methods.zero  # noqa: F401  (registers zero)
from vlmtta.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-speed", *sys.argv[1:]]))
