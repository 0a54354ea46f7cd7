"""Loads a run directory's TensorBoard event files with TensorBoard's own reader and prints
every scalar as `tag<TAB>step<TAB>value`, to check the files nerve writes.

Usage: python tools/check_tensorboard.py RUN_DIR    (needs `pip install tensorboard`)

Exits 1 when TensorBoard finds no scalar in RUN_DIR.
"""

import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    if not os.path.isdir(sys.argv[1]):
        print(f"{sys.argv[1]}: not a directory", file=sys.stderr)
        return 2
    # size_guidance 0: keep every scalar instead of a reservoir sample of them.
    acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0}).Reload()
    tags = acc.Tags()["scalars"]
    for tag in tags:
        for event in acc.Scalars(tag):
            print(f"{tag}\t{event.step}\t{event.value:g}")
    if not tags:
        print(f"no scalars in {sys.argv[1]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
