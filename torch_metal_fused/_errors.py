"""Errors shared by the dispatcher (`_backend`) and the backends below it."""

from __future__ import annotations


class KernelUnavailable(RuntimeError):
    """Our kernels cannot serve a call; raised before anything was encoded (by the compiled extension, translated
    from tmf::launch::KernelUnavailable, and by the harness runner). scope "family": the family's library or a
    pipeline cannot be built, or it does not run 32-wide SIMD-groups; scope "call": no launch plan fits this
    call on this device's pipelines."""

    def __init__(self, family: str, scope: str, reason: str) -> None:
        super().__init__(f"the {family} kernels are unavailable: {reason}")
        self.family, self.scope, self.reason = family, scope, reason

    def __reduce__(self):
        return type(self), (self.family, self.scope, self.reason)
