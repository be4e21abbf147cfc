"""The NaN and ±inf contract covers every public op (tests/nan_inf.py says what it asks): each op's contract file,
named by the manifest, holds a test marked `nan_inf_contract(op)`, so a new op cannot skip it."""

from __future__ import annotations

import importlib
import inspect

from helpers import PUBLIC_OPS

import torch_metal_fused as tmf
from torch_metal_fused._families import OPS


def test_every_public_op_is_covered():
    covered: dict[str, list[str]] = {}
    for module_name in sorted({op.contract.removesuffix(".py") for op in OPS}):
        for name, fn in vars(importlib.import_module(module_name)).items():
            for op in getattr(fn, "nan_inf_ops", ()):
                assert name.startswith("test_nan_inf"), f"{module_name}.{name}: name NaN/inf tests test_nan_inf*"
                covered.setdefault(op, []).append(f"{module_name}.{name}")
    for op in OPS:
        assert any(t.startswith(op.contract.removesuffix(".py") + ".") for t in covered.get(op.name, ())), (
            f"{op.name}: no test_nan_inf* marked nan_inf_contract({op.name!r}) in tests/{op.contract}"
        )
    assert set(covered) == set(PUBLIC_OPS), f"covered {sorted(covered)}, PUBLIC_OPS {sorted(PUBLIC_OPS)}"
    exported_ops = {
        name
        for name in tmf.__all__
        if inspect.isfunction(getattr(tmf, name)) and getattr(tmf, name).__module__.startswith("torch_metal_fused.ops")
    }
    assert exported_ops, "no op found in torch_metal_fused.__all__"
    assert exported_ops <= set(PUBLIC_OPS), (
        f"exported ops missing from PUBLIC_OPS: {sorted(exported_ops - set(PUBLIC_OPS))}"
    )
