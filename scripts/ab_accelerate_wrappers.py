"""A/B of GANStep's direct backward/optimizer calls against Accelerate's wrappers (one process, the
same models and optimizers, alternating rounds), as quoted in docs/PERFORMANCE.md:

    .venv/bin/python scripts/ab_accelerate_wrappers.py [WIDTH] [RESOLUTION]
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facegan_dist import dist  # noqa: E402
from facegan_dist.config import merge_train_config  # noqa: E402
from facegan_dist.train.setup import (  # noqa: E402
    build_gan,
    build_step,
    memory_format_and_optimizers,
    model_input,
)


def main(width: int = 8, res: int = 16, batch: int = 16, steps: int = 100, rounds: int = 7):
    cfg = merge_train_config("demo", None, {"data": "x", "g_width": width, "d_width": width})
    cfg = cfg.validate()
    acc = dist.build_accelerator("no")
    fast = cfg.fast_settings(acc.device.type)
    G, D = build_gan(cfg, res)
    G, D, opt_g, opt_d = memory_format_and_optimizers(G, D, cfg, fast)
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
    direct = build_step(acc, G, D, opt_g, opt_d, cfg, fast, batch=batch, resolution=res)
    wrapped = build_step(acc, G, D, opt_g, opt_d, cfg, fast, batch=batch, resolution=res)
    wrapped.bw, wrapped.opt_g_hot, wrapped.opt_d_hot = acc, opt_g, opt_d  # Accelerate's path
    real = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8)

    def cpu_ms(step, n):
        t = time.process_time()
        for s in range(n):
            step(s, lambda: (model_input(real, acc.device, fast), None))
        return (time.process_time() - t) / n * 1000

    cpu_ms(direct, 10), cpu_ms(wrapped, 10)
    a, b = [], []
    for _ in range(rounds):
        a.append(cpu_ms(direct, steps))
        b.append(cpu_ms(wrapped, steps))
    da, db = statistics.median(a), statistics.median(b)
    print(f"width {width} {res}px batch {batch}: CPU ms/step direct {da:.3f}, "
          f"via accelerate wrappers {db:.3f}, saved {db - da:.3f} ms")  # fmt: skip


if __name__ == "__main__":
    main(*[int(x) for x in sys.argv[1:3]])
