"""Host syncs without a GPU: the aten ops that make the host wait for the device (a value read back, a shape
that depends on the data, a copy to the host), counted on tensors that are not on the CPU.

Run the code on the meta device (the GPU's stand-in: shapes, no data) inside `HostSyncs()`: each such op on
a meta tensor is recorded before it runs (and then fails, as reading a meta tensor must). Tensors the code
keeps on the CPU on purpose (Adam's step counters) are not counted: on a GPU they stay on the host too."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default, aten.equal.default,
            aten.masked_select.default, aten._unique2.default, aten.unique_consecutive.default,
            aten.repeat_interleave.Tensor}


class HostSync(Exception):
    pass


class HostSyncs(TorchDispatchMode):
    """Records each host sync on a non-CPU tensor in `self.ops` and raises HostSync there."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_device = any(t.device.type != "cpu" for t in tensors)
        to_host = func in (aten._to_copy.default, aten.copy_.default) and on_device and (
            kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu"
            or func is aten.copy_.default and args[0].device.type == "cpu")
        if on_device and func in SYNC_OPS or to_host:
            self.ops.append(str(func))
            raise HostSync(f"host sync: {func}")
        return func(*args, **kwargs)
