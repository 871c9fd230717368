"""The child process of test_crash: writes through Qcow2File until it is killed.

Slot ``i`` of a shuffled list gets pattern ``i``; after every few writes it flushes and prints how
many slot writes that flush covered. Between them, and after the last slot until it is killed, it
writes, discards and zeroes a scratch area, so that clusters are freed and reused.
"""

from __future__ import annotations

import itertools
import random
import sys

from vmsh.devices.storage.qcow2 import Qcow2File

SLOT = 3 * 512  # slots straddle cluster boundaries: partial clusters are filled from the backing file
SLOTS = 4096
SCRATCH = SLOT * SLOTS  # the scratch area starts past the slots


def pattern(seed: int, i: int) -> bytes:
    return random.Random(f"{seed}-{i}").randbytes(SLOT)


def order(seed: int) -> list[int]:
    slots = list(range(SLOTS))
    random.Random(seed).shuffle(slots)
    return slots


def main(path: str, seed: int, size: int) -> None:
    disk = Qcow2File(path, readonly=False)
    rng = random.Random(seed + 1)
    print("open", flush=True)
    slots = order(seed)
    for i in itertools.count():
        if i < SLOTS:
            disk.write([memoryview(pattern(seed, i))], slots[i] * SLOT)
        if rng.random() < 0.5 or i >= SLOTS:  # then only the scratch area, until killed
            n = rng.choice([512, 8192, 65536])
            off = rng.randrange(SCRATCH // 512, (size - n) // 512) * 512
            disk.write([memoryview(rng.randbytes(n))], off)
            if rng.random() < 0.5:
                start = off // 65536 * 65536
                disk.discard(start, min(131072, size - start))
            else:
                disk.write_zeroes(off, n, unmap=True)
        if i % 7 == 6:
            disk.flush()
            print(min(i + 1, SLOTS), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
