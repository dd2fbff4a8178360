"""Saved-tensor accounting: the bytes autograd keeps for backward during one forward, counted exactly.

`SavedTensorCounter` pushes ``torch.autograd.graph.saved_tensors_hooks`` for the duration of a forward; every tensor
an op saves for its backward passes through the pack hook, and the counter adds the bytes of its *storage* once
(views and tensors saved by several ops share a storage and count once). Parameters (and anything else whose storage
is listed in ``exclude``) are static memory, not activations, and are skipped. The same code runs on meta tensors
(shapes only: a full SD U-Net costs no memory) and on real tensors, which is how the tests check the meta count.

Inside a non-reentrant activation checkpoint, torch's own hooks take precedence, so a checkpointed segment adds only
what it saves outside (its inputs stay alive through the checkpoint's closure and are saved by the ops around it).

`flash_sdpa` makes ``F.scaled_dot_product_attention`` save what a GPU's flash / memory-efficient kernel saves
(q, k, v, the output and the fp32 row log-sum-exp, no B x H x Lq x Lk tensor) on every device: on CPU and meta,
torch's SDPA would otherwise pick its math path, which keeps the probabilities.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

_ORIGINAL_SDPA = F.scaled_dot_product_attention


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if not torch.is_grad_enabled():  # nothing is saved (e.g. the frozen text towers, with their causal masks)
        return _ORIGINAL_SDPA(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )  # fmt: skip
    if attn_mask is not None or enable_gqa:
        raise ValueError("memory planning models SDPA without attention masks (the SD U-Nets use none)")
    # the CPU flash-attention op has meta kernels and the autograd formula of the GPU kernels (saves out + LSE)
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, scale=scale
    )
    return out[0]


@contextlib.contextmanager
def flash_sdpa() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` saves what a flash / memory-efficient GPU kernel saves, on any device."""
    F.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _ORIGINAL_SDPA


@dataclass
class SavedTensorCounter:
    """Unique storage bytes saved for backward while open (``with counter: loss = model(...)``).

    ``exclude``: tensors whose storages are not activations (the parameters). ``labels`` (optional): a callable
    returning the current attribution label (e.g. the module running now); bytes are summed per label in
    ``by_label``, each storage under the label current when it was first saved.
    """

    exclude: Iterable[torch.Tensor] = ()
    labels: object = None
    total: int = 0
    largest: int = 0  # bytes of the largest single storage saved
    by_label: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._excluded = {id(t.untyped_storage()): t.untyped_storage() for t in self.exclude}
        self._seen: dict[int, torch.UntypedStorage] = {}  # strong refs: an id is not reused while counting
        self._hooks = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = id(storage)
        if key not in self._excluded and key not in self._seen:
            self._seen[key] = storage
            nbytes = storage.nbytes()
            self.total += nbytes
            self.largest = max(self.largest, nbytes)
            if self.labels is not None:
                label = self.labels()
                self.by_label[label] = self.by_label.get(label, 0) + nbytes
        return t

    def hold(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors kept alive past the forward by other means than autograd (a recorder's maps, held until
        the losses are read), once each and only when not already saved for backward."""
        for t in tensors:
            self._pack(t)

    def __enter__(self) -> SavedTensorCounter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
        self._seen.clear()  # the graph keeps what it saved; the counter holds nothing after the forward


class ModuleLabels:
    """The attribution label of a `SavedTensorCounter`: the innermost of the watched modules that is running
    (forward pre / post hooks), else ``"other"``. `modules`: (label, module) pairs; labels may repeat."""

    def __init__(self, modules: Iterable[tuple[str, torch.nn.Module]]):
        self.stack: list[str] = []
        self.handles = []
        for name, mod in modules:
            self.handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: self.stack.append(name)))
            self.handles.append(mod.register_forward_hook(self._leave))

    def _leave(self, module, args, output) -> None:  # returns None: the module's output is left as it is
        self.stack.pop()

    def __call__(self) -> str:
        return self.stack[-1] if self.stack else "other"

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
