"""Speed of the toy judge on one core: images/s of ``judge_batch`` on 1,000 rendered scenes, next to a plain
per-image Python loop over ``judge``.

Run as ``.venv/bin/python bench/judge_speed.py [--n 1000] [--repeats 3]``. Thread pools are limited to one
thread before numpy loads and the process is pinned to one CPU, so the number is a single-core rate; on a
machine busy with other work it is a lower bound.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"  # before numpy (and anything that loads torch) is imported

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from diffalign.toy.judge import judge, judge_batch  # noqa: E402
from diffalign.toy.scenes import all_count_prompts, all_relation_prompts, render_scene  # noqa: E402


def _pin_to_one_cpu() -> str:
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned"
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return f"pinned to CPU {cpu}"


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="rendered scenes to judge")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best one counts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pinned = _pin_to_one_cpu()
    rng = np.random.default_rng(args.seed)
    families = (all_count_prompts(), all_relation_prompts())
    prompts = [families[k % 2][int(rng.integers(len(families[k % 2])))] for k in range(args.n)]
    images = np.stack([render_scene(p, rng).image for p in prompts])

    judge_batch(images[:32], prompts[:32])  # warm-up: builds the colour lookup table
    batch_s = _best_time(lambda: judge_batch(images, prompts), args.repeats)
    loop_s = _best_time(lambda: [judge(im, p) for im, p in zip(images, prompts, strict=True)], args.repeats)
    success = judge_batch(images, prompts)[0].mean()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"judge speed, 1 thread, {pinned}, load average {load:.2f}, {args.n} rendered scenes "
          f"(half count, half relation prompts), best of {args.repeats}")
    print(f"  judge_batch         : {args.n / batch_s:8.0f} images/s  ({1e3 * batch_s / args.n:.3f} ms/image)")
    print(f"  per-image judge loop: {args.n / loop_s:8.0f} images/s  ({1e3 * loop_s / args.n:.3f} ms/image)")
    print(f"  batch / loop        : {loop_s / batch_s:8.1f}x")
    print(f"  success on the rendered scenes: {success:.3f}")


if __name__ == "__main__":
    main()
