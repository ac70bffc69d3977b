"""Time ase.io.read(f, index=':') on the extxyz benchmark file of benches/extxyz.rs.

Run the Rust benchmark first (it generates the file), then:
    python3 crates/structures/benches/extxyz_ase.py [--repeat 3]
"""

import argparse
import os
import tempfile
import time

import ase
import ase.io


def main():
    p = argparse.ArgumentParser()
    p.add_argument(
        "--file",
        default=os.path.join(tempfile.gettempdir(), "matscale-bench", "cu64_100mb.extxyz"),
    )
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    if not os.path.exists(args.file):
        raise SystemExit(f"{args.file} missing: run `cargo bench -p matscale-structures --bench extxyz` first")
    size = os.path.getsize(args.file) / 1e6
    times, cpu = [], []
    for _ in range(args.repeat):
        t, c = time.perf_counter(), time.process_time()
        frames = ase.io.read(args.file, index=":")
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    n_atoms = sum(len(a) for a in frames)
    assert frames[0].get_stress().shape == (6,)
    print(
        f"ase {ase.__version__}: {len(frames)} frames, {n_atoms} atoms, {size:.1f} MB: "
        f"best {min(times):.3f} s, median {sorted(times)[len(times) // 2]:.3f} s "
        f"({size / min(times):.1f} MB/s); CPU mean {sum(cpu) / len(cpu):.3f} s"
    )


if __name__ == "__main__":
    main()
