"""e3nn reference timing for docs/BENCHMARKS.md: o3.spherical_harmonics on 10^6 random vectors.

l <= 6 (and l <= 4), float32, normalize=True, normalization='component', torch with 2 threads.
Warm timing: the first calls (which generate code) are run and reported separately, then
`--repeats` timed calls; prints best and median. Run through sh_compare.sh, which also runs the
matscale criterion bench on the same input size right after.
"""
import argparse
import statistics
import time

import e3nn
import torch
from e3nn import o3

parser = argparse.ArgumentParser()
parser.add_argument("--n", type=int, default=1_000_000)
parser.add_argument("--repeats", type=int, default=20)
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()

torch.set_num_threads(args.threads)
print(f"e3nn {e3nn.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, n = {args.n}")
torch.manual_seed(0)
for lmax, dtype in [(6, torch.float32), (4, torch.float32), (6, torch.float64)]:
    x = torch.randn(args.n, 3, dtype=dtype)
    ls = list(range(lmax + 1))
    cold = []
    for _ in range(3):
        t0 = time.perf_counter()
        o3.spherical_harmonics(ls, x, normalize=True, normalization="component")
        cold.append(time.perf_counter() - t0)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        y = o3.spherical_harmonics(ls, x, normalize=True, normalization="component")
        times.append(time.perf_counter() - t0)
        del y
    print(
        f"e3nn spherical_harmonics l<={lmax} {str(dtype).removeprefix('torch.')}: "
        f"best {min(times) * 1e3:.1f} ms, median {statistics.median(times) * 1e3:.1f} ms "
        f"(first calls {', '.join(f'{c * 1e3:.0f}' for c in cold)} ms)"
    )
