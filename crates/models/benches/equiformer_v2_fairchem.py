"""fairchem's EquiformerV2 on the CPU or a GPU, the reference side of equiformer_v2_compare.sh.

Builds fairchem 1.x `EquiformerV2Backbone` with `EqV2ScalarHead` (energy), `EqV2VectorHead`
(direct forces) and `Rank2SymmetricTensorHead` (stress; `--heads energy,forces` leaves it out)
-- the OMat24 HydraModel -- from a fairchem source checkout through
tests/data/equiformer_v2/fairchem_stubs.py, in float32, eval mode, and times, on the batch
written by `equiformer_v2 input PATH` (the same structures and edge list as the matscale side):

* forward: backbone + heads;
* forward_backward: the same, then `loss.backward()` of `mean(E^2) + mean(F^2)` (the weight
  gradients).

One measurement per process: prints one JSON line with every repetition's seconds, the best,
the median, the process's peak RSS (`ru_maxrss`) and, on a GPU, the peak of PyTorch's CUDA
allocator over the timed repetitions (`torch.cuda.max_memory_allocated`). On a GPU every
repetition ends with `float(loss)`, which waits for the device.

Usage: python equiformer_v2_fairchem.py --fairchem CHECKOUT --input BATCH.json
       [--config small|eqv2-s] [--phase forward|forward_backward] [--reps 3] [--warmup 1]
       [--threads 2] [--heads energy,forces,stress] [--device cpu|cuda]
"""

import argparse
import json
import pathlib
import resource
import statistics
import sys
import time
import types

import torch

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "data" / "equiformer_v2"))
import fairchem_stubs  # noqa: E402

# OMat24 eqV2-S (fairchem's eqV2_31M_omat configuration); `small` changes two fields.
EQV2_S = dict(
    num_layers=8,
    sphere_channels=128,
    attn_hidden_channels=64,
    num_heads=8,
    attn_alpha_channels=64,
    attn_value_channels=16,
    ffn_hidden_channels=128,
    norm_type="layer_norm_sh",
    lmax_list=[4],
    mmax_list=[2],
    grid_resolution=18,
    num_sphere_samples=128,
    edge_channels=128,
    use_atom_edge_embedding=True,
    share_atom_edge_embedding=False,
    use_m_share_rad=False,
    distance_function="gaussian",
    num_distance_basis=512,
    attn_activation="silu",
    use_s2_act_attn=False,
    use_attn_renorm=True,
    ffn_activation="silu",
    use_gate_act=False,
    use_grid_mlp=True,
    use_sep_s2_act=True,
    alpha_drop=0.1,
    drop_path_rate=0.1,
    proj_drop=0.0,
    weight_init="uniform",
    max_neighbors=20,
    max_radius=12.0,
    max_num_elements=96,
    avg_num_nodes=31.17,
    avg_degree=61.95,
)
CONFIGS = {"eqv2-s": EQV2_S, "small": {**EQV2_S, "num_layers": 2, "sphere_channels": 64}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--fairchem", required=True, help="fairchem source checkout (1.x)")
    p.add_argument("--input", required=True, help="batch JSON from `equiformer_v2 input`")
    p.add_argument("--config", default="small", choices=sorted(CONFIGS))
    p.add_argument("--phase", default="forward", choices=["forward", "forward_backward"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--heads", default="energy,forces,stress")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:0)")
    p.add_argument("--profile", help="after timing, profile one more step with torch.profiler "
                   "and write its per-kernel table (by device time) to this file")
    a = p.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: PyTorch sees no CUDA device")
    torch.set_num_threads(a.threads)
    torch.manual_seed(7)

    eqv2, scalar, vector, rank2 = fairchem_stubs.load(a.fairchem)
    backbone = eqv2.EquiformerV2Backbone(**CONFIGS[a.config])
    makers = {
        "energy": lambda: scalar.EqV2ScalarHead(backbone),
        "forces": lambda: vector.EqV2VectorHead(backbone),
        "stress": lambda: rank2.Rank2SymmetricTensorHead(
            backbone, decompose=True, use_source_target_embedding=True
        ),
    }
    heads = {name: makers[name]() for name in a.heads.split(",")}
    modules = [backbone, *heads.values()]
    for m in modules:
        m.to(device)
        m.eval()
    n_parameters = sum(p.numel() for m in modules for p in m.parameters())

    batch = json.loads(pathlib.Path(a.input).read_text())
    numbers, positions, batch_index = [], [], []
    for b, s in enumerate(batch["structures"]):
        numbers += s["numbers"]
        positions += s["positions"]
        batch_index += [b] * len(s["numbers"])
    e = batch["edges"]
    src = torch.tensor(e["src"], device=device)
    dst = torch.tensor(e["dst"], device=device)
    vec = torch.tensor(e["vec"], dtype=torch.float32, device=device)
    z_all = torch.tensor(numbers, device=device)
    b_all = torch.tensor(batch_index, device=device)
    edge_index, dist = torch.stack([src, dst]), vec.norm(dim=1)

    # The edge list is given (the same as matscale's): fairchem's own graph generation is
    # bypassed, as in the parity fixture. A fresh namespace per call: the backbone overwrites
    # `edge_distance` with its Gaussian expansion.
    def graph(*_args, **_kwargs):
        return types.SimpleNamespace(
            atomic_numbers_full=z_all,
            batch_full=b_all,
            edge_index=edge_index,
            edge_distance=dist,
            edge_distance_vec=vec,
            node_offset=0,
        )

    backbone.generate_graph = graph
    data = types.SimpleNamespace(
        natoms=torch.tensor([len(s["numbers"]) for s in batch["structures"]], device=device),
        pos=torch.tensor(positions, dtype=torch.float32, device=device),
        atomic_numbers=z_all,
        batch=b_all,
    )
    backward = a.phase == "forward_backward"

    def step():
        for m in modules:
            m.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):
            emb = backbone(data)
            out = {k: v for h in heads.values() for k, v in h(data, emb).items()}
            # The stress is computed (and its graph freed: it is not in the loss).
            out.pop("stress", None)
            out.pop("stress_isotropic", None)
            out.pop("stress_anisotropic", None)
            loss = out["energy"].square().mean()
            if "forces" in out:
                loss = loss + out["forces"].square().mean()
            if backward:
                loss.backward()
        return float(loss)

    for _ in range(a.warmup):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(a.reps):
        t = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            step()
            if cuda:
                torch.cuda.synchronize(device)
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        with open(a.profile, "w") as f:
            f.write(prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=90))
    print(
        json.dumps(
            {
                "impl": "fairchem",
                "config": a.config,
                "phase": a.phase,
                "heads": a.heads,
                "parameters": n_parameters,
                "atoms": len(numbers),
                "edges": len(e["src"]),
                "threads": torch.get_num_threads(),
                "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "torch": torch.__version__,
                "seconds": seconds,
                "best_s": min(seconds),
                "median_s": statistics.median(seconds),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "peak_device_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
