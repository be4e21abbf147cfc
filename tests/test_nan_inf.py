"""The NaN and ±inf contract covers every public op (tests/nan_inf.py says what it asks): each op's contract file,
named by the manifest, holds a test marked `nan_inf_contract(op)`, so a new op cannot skip it."""

from __future__ import annotations

import inspect

from helpers import PUBLIC_OPS, contract_module

import torch_metal_fused as tmf
from torch_metal_fused._families import OPS


def test_every_public_op_is_covered():
    for op in OPS:
        marked = [
            name for name, fn in vars(contract_module(op.contract)).items() if op.name in getattr(fn, "nan_inf_ops", ())
        ]
        assert marked, f"{op.name}: no test marked nan_inf_contract({op.name!r}) in tests/{op.contract}"
        assert all(name.startswith("test_nan_inf") for name in marked), f"{op.name}: name them test_nan_inf*: {marked}"
    exported_ops = {
        name
        for name in tmf.__all__
        if inspect.isfunction(getattr(tmf, name)) and getattr(tmf, name).__module__.startswith("torch_metal_fused.ops")
    }
    assert exported_ops, "no op found in torch_metal_fused.__all__"
    assert exported_ops <= set(PUBLIC_OPS), (
        f"exported ops missing from PUBLIC_OPS: {sorted(exported_ops - set(PUBLIC_OPS))}"
    )
