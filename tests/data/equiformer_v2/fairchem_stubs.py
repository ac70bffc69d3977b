"""Imports fairchem 1.x EquiformerV2 module files from a source checkout without installing
fairchem-core (whose dependencies do not resolve against the project venv's torch).

Small stand-ins replace the few helpers those files import from outside the model's math: the
model registry decorator, `gp_utils.initialized` (graph parallelism off), `conditional_grad`,
the base-class mixins, `torch_geometric.utils.softmax` (PyG's: max-shifted, `+1e-16`) and
`torch_scatter.scatter` (sum / mean), on the device of their input.

Usage: `eqv2, scalar, vector, rank2 = fairchem_stubs.load(checkout)`.
"""

import importlib
import pathlib
import sys
import types

import torch


def module(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


class _Registry:
    @staticmethod
    def register_model(_name):
        return lambda cls: cls


def _softmax(src, index, num_nodes=None):
    n = int(index.max()) + 1 if num_nodes is None else num_nodes
    shape = (n,) + src.shape[1:]
    idx = index.view(-1, *([1] * (src.dim() - 1))).expand_as(src)
    smax = torch.full(shape, -float("inf"), dtype=src.dtype, device=src.device).scatter_reduce(
        0, idx, src, "amax", include_self=True
    )
    out = (src - smax.gather(0, idx)).exp()
    denom = torch.zeros(shape, dtype=src.dtype, device=src.device).scatter_add(0, idx, out)
    return out / (denom.gather(0, idx) + 1e-16)


def _scatter(src, index, dim=0, reduce="sum", dim_size=None):
    assert dim == 0
    n = int(index.max()) + 1 if dim_size is None else dim_size
    out = torch.zeros((n,) + src.shape[1:], dtype=src.dtype, device=src.device)
    out.index_add_(0, index, src)
    if reduce == "mean":
        count = torch.zeros(n, dtype=src.dtype, device=src.device).index_add_(
            0, index, torch.ones_like(index, dtype=src.dtype)
        )
        out = out / count.clamp(min=1).view(-1, *([1] * (src.dim() - 1)))
    return out


class _Mixin:
    pass


def load(checkout):
    """Returns fairchem's (equiformer_v2, heads.scalar, heads.vector, heads.rank2) modules."""
    src = pathlib.Path(checkout) / "src"
    _install(src)
    get = importlib.import_module
    base = "fairchem.core.models.equiformer_v2"
    return (
        get(f"{base}.equiformer_v2"),
        get(f"{base}.heads.scalar"),
        get(f"{base}.heads.vector"),
        get(f"{base}.heads.rank2"),
    )


def _install(src):
    for pkg in ["fairchem", "fairchem.core", "fairchem.core.common", "fairchem.core.models"]:
        module(pkg, __path__=[str(src / pkg.replace(".", "/"))])
    module("fairchem.core.common.registry", registry=_Registry())
    module("fairchem.core.common.gp_utils", initialized=lambda: False)
    module("fairchem.core.common.utils", conditional_grad=lambda _g: (lambda f: f))
    module(
        "fairchem.core.models.base",
        GraphModelMixin=_Mixin,
        HeadInterface=_Mixin,
        BackboneInterface=_Mixin,
        GraphData=object,
    )
    module("torch_geometric", utils=module("torch_geometric.utils", softmax=_softmax))
    module("torch_scatter", scatter=_scatter)
    # the packages themselves without their __init__ (which imports the deprecated model)
    module(
        "fairchem.core.models.equiformer_v2",
        __path__=[str(src / "fairchem/core/models/equiformer_v2")],
    )
    module("fairchem.core.models.scn", __path__=[str(src / "fairchem/core/models/scn")])
