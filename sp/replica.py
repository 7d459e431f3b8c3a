"""What the ranks of one replica (the `cfg x sp` ranks making one video) share without each loading
it: the text encoder and the prompts typed at the terminal live on the replica root, and their
results are broadcast; the VAE decodes on the root (or, split, on every rank: `sp/vae_split.py`).

These are drop-in replacements of the objects `core.generate.generate_video` calls (`encode`,
`streaming_decoder`, a prompt feed), so every rank runs the same generation code: the root's
calls compute and broadcast, the other ranks' calls receive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


def broadcast_tensor(value: Tensor | None, group: dist.ProcessGroup, root: int, device: torch.device) -> Tensor:
    """`value` of the root (global rank `root`) on every rank of `group`, on `device`."""
    header = [None if value is None else (tuple(value.shape), value.dtype)]
    dist.broadcast_object_list(header, src=root, group=group, device=device if device.type == "cuda" else None)
    shape, dtype = header[0]
    out = value.to(device).contiguous() if value is not None else torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(out, src=root, group=group)
    return out


class ReplicaTextEncoder:
    """`encode(prompts)` of a `core.text.TextEncoder` that exists on the replica root only: the root
    encodes and broadcasts, the other ranks receive (every rank calls it with the same prompts)."""

    def __init__(self, encoder, group: dist.ProcessGroup, root: int, device: torch.device):
        is_root = dist.get_rank() == root
        if is_root != (encoder is not None):
            raise ValueError("the text encoder must exist on the replica root, and only there")
        self.encoder, self.group, self.root, self.device = encoder, group, root, device

    def encode(self, prompts: Sequence[str]) -> Tensor:
        local = self.encoder.encode(prompts) if self.encoder is not None else None
        return broadcast_tensor(local, self.group, self.root, self.device)


class BroadcastFeed:
    """A `core.interactive.PromptFeed` shared by the ranks of one replica: the root's `feed` (the
    terminal's prompts, encoded on the root's own thread) decides at each chunk boundary, and the
    chosen prompt and its context are broadcast, so every rank switches at the same chunk."""

    def __init__(self, feed, group: dist.ProcessGroup, root: int, device: torch.device):
        is_root = dist.get_rank() == root
        if is_root != (feed is not None):
            raise ValueError("the prompt feed must exist on the replica root, and only there")
        self.feed, self.group, self.root, self.device = feed, group, root, device

    @property
    def switches(self) -> list:
        return self.feed.switches if self.feed is not None else []

    def __enter__(self) -> BroadcastFeed:
        if self.feed is not None:
            self.feed.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.feed is not None:
            self.feed.__exit__(*exc)

    def take(self, chunk: int):
        taken = self.feed.take(chunk) if self.feed is not None else None
        box = [None if taken is None else taken[0]]
        dist.broadcast_object_list(box, src=self.root, group=self.group,
                                   device=self.device if self.device.type == "cuda" else None)
        if box[0] is None:
            return None
        return box[0], broadcast_tensor(taken[1] if taken is not None else None, self.group, self.root, self.device)


class ReplicaVAE(nn.Module):
    """The VAE of one rank of a replica. `encode` (the image of image-to-video) runs on the root and
    is broadcast. `streaming_decoder()`: with `decoders` (sp/vae_split.py) every rank decodes its band
    and the root gets whole frames (the others none); else only the root decodes. A rank without a
    VAE carries an empty parameter: its device and dtype."""

    def __init__(self, vae: nn.Module | None, group: dist.ProcessGroup, root: int, device: torch.device,
                 dtype: torch.dtype, decoders: Callable[[], object] | None = None):
        super().__init__()
        self.vae = vae
        self.anchor = nn.Parameter(torch.empty(0, device=device, dtype=dtype), requires_grad=False) \
            if vae is None else None
        self.group, self.root, self.device = group, root, device
        self.decoders = decoders
        self.is_root = dist.get_rank() == root

    def encode(self, video: Tensor) -> Tensor:
        local = self.vae.encode(video) if self.is_root else None
        return broadcast_tensor(local, self.group, self.root, self.device)

    def streaming_decoder(self):
        if self.decoders is not None:
            return self.decoders()
        assert self.is_root, "only the replica root decodes (or every rank, split)"
        return self.vae.streaming_decoder()
