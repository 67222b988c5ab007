#!/usr/bin/env python
"""Speed benchmark of every registered method (same as `vlmtta bench-speed`).

Example:
    python scripts/bench_speed.py --model ViT-B-16 --pretrained none --n-views 64 --n-classes 1000 \
        --output results/speed_vitb16.json
"""
import sys

from vlmtta.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-speed", *sys.argv[1:]]))
