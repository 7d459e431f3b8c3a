"""Where the frames of a teacher-forcing sample live under sequence parallelism.

Balanced layout (the official one): rank r of `sp` owns the contiguous latent frames
`[r*F_loc, (r+1)*F_loc)` and builds its local sequence as `[clean of its frames | noisy of its
frames]`. Ulysses concatenates the ranks' sequences in rank order, giving the "natural" global
order `[r0 clean, r0 noisy, r1 clean, r1 noisy, ...]`; `NaturalTeacherForcingMask` maps a token
index back to its single-process index so that no tokens need to move. Every rank holds the same
number of loss-bearing (noisy) tokens.

Naive layout (for comparison): the single-process sequence `[all clean | all noisy]` cut into `sp`
equal pieces; with even `sp` each piece is whole frames of one half, so the first half of the ranks
hold only clean tokens (no loss) and the rest only noisy ones.

Legend: B batch, K prompt chunks per sample, T text slots, D width, F frames, S tokens per frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from core.attention import AttentionMask, BlockCausalMask, TeacherForcingMask
from core.config import require
from sp.ulysses import padded_length, padded_mask_mod


@dataclass(frozen=True)
class NaturalTeacherForcingMask:
    """The teacher-forcing mask in the natural (rank-major, paired) order, followed by padding
    tokens (up to `padded_length`) that attend only to themselves."""

    sp: int
    local_frames: int
    tokens_per_frame: int
    frames_per_block: int
    padded_length: int

    def __post_init__(self):
        require(self.padded_length >= self.real_length,
                f"padded length {self.padded_length} is shorter than the {self.real_length} real tokens")

    @property
    def real_length(self) -> int:
        return 2 * self.sp * self.local_frames * self.tokens_per_frame

    @property
    def length(self) -> int:
        return self.padded_length

    def single_process_index(self, idx):
        """The index in `[all clean | all noisy]` of natural token indices."""
        side = self.local_frames * self.tokens_per_frame  # one side (clean or noisy) of one rank
        rank, offset = idx // (2 * side), idx % (2 * side)
        return (offset >= side) * (self.sp * side) + rank * side + offset % side

    def mask_mod(self, b, h, q_idx, kv_idx):
        single = TeacherForcingMask(self.sp * self.local_frames, self.tokens_per_frame, self.frames_per_block)

        def natural_mod(b, h, q, kv):  # the single-process mask, read through the index map
            return single.mask_mod(b, h, self.single_process_index(q), self.single_process_index(kv))

        return padded_mask_mod(natural_mod, self.real_length, b, h, q_idx, kv_idx)


def natural_token_order(sp: int, local_frames: int, tokens_per_frame: int) -> Tensor:
    """For each token of the natural order, its index in the single-process `[all clean | all noisy]`
    order (a permutation of `2*sp*local_frames*tokens_per_frame` indices)."""
    num_frames = sp * local_frames
    rank = torch.arange(sp).view(sp, 1, 1, 1)
    side = torch.arange(2).view(1, 2, 1, 1)
    frame = rank * local_frames + torch.arange(local_frames).view(1, 1, local_frames, 1)
    token = torch.arange(tokens_per_frame).view(1, 1, 1, tokens_per_frame)
    single_RSFS = (side * num_frames + frame) * tokens_per_frame + token
    return single_RSFS.flatten()


@dataclass(frozen=True)
class _FrameLayout:
    """Rank `sp_rank` of `sp_size` holds the contiguous frames `[first_frame, + held_frames)` of
    `num_frames` (per half for the naive layout); subclasses say which."""

    sp_size: int
    sp_rank: int
    num_frames: int
    frames_per_block: int

    def __post_init__(self):
        require(0 <= self.sp_rank < self.sp_size, f"SP rank {self.sp_rank} is outside 0..{self.sp_size - 1}")

    # Subclasses define the properties `first_frame` and `held_frames`.

    @property
    def frame_range(self) -> range:
        return range(self.first_frame, self.first_frame + self.held_frames)

    def shard(self, x: Tensor, dim: int) -> Tensor:
        """This rank's frames of a per-frame tensor (latents `dim=2`, timesteps/masks `dim=1`)."""
        if x.shape[dim] != self.num_frames:
            raise ValueError(f"dim {dim} of shape {tuple(x.shape)} is not the {self.num_frames} frames")
        return x.narrow(dim, self.first_frame, self.held_frames)

    def prompts(self, context: Tensor, prompt_chunks: int) -> Tensor:
        """The prompts of the held frames of a sample-major `[B*K, T, D]` context with K = `prompt_chunks`
        equal frame chunks per sample (K = 1: the one prompt is shared). Out: `[B*K', T, D]`, K' the
        chunks the held frames span."""
        if context.shape[0] % prompt_chunks:
            raise ValueError(f"a context of {context.shape[0]} prompts is not {prompt_chunks} prompts per sample")
        if prompt_chunks == 1:
            return context
        if self.num_frames % prompt_chunks:
            raise ValueError(f"{self.num_frames} frames cannot be cut into {prompt_chunks} equal prompt chunks")
        chunk_frames, held = self.num_frames // prompt_chunks, self.held_frames
        if held % chunk_frames and chunk_frames % held:
            raise ValueError(f"pieces of {held} frames do not align with prompt chunks of {chunk_frames} frames")
        first, count = self.first_frame // chunk_frames, max(1, held // chunk_frames)
        return context.unflatten(0, (-1, prompt_chunks))[:, first:first + count].flatten(0, 1)


@dataclass(frozen=True)
class BalancedLayout(_FrameLayout):
    """Rank `sp_rank`'s share of `num_frames` latent frames: a contiguous, block-aligned range."""

    def __post_init__(self):
        super().__post_init__()
        require(self.num_frames % (self.sp_size * self.frames_per_block) == 0,
                f"{self.num_frames} latent frames are not divisible by SP size x frames per block "
                f"= {self.sp_size} x {self.frames_per_block}")

    def prompts(self, context: Tensor, prompt_chunks: int) -> Tensor:
        # Each rank takes whole chunks of its own (§4.2): 1 chunk, or a multiple of the SP size.
        require(prompt_chunks == 1 or prompt_chunks % self.sp_size == 0,
                f"{prompt_chunks} prompt chunks must be 1 or divisible by SP size {self.sp_size}")
        return super().prompts(context, prompt_chunks)

    @property
    def local_frames(self) -> int:
        return self.num_frames // self.sp_size

    @property
    def first_frame(self) -> int:
        return self.sp_rank * self.local_frames

    @property
    def held_frames(self) -> int:
        return self.local_frames

    def global_mask(self, local_mask: AttentionMask, use_flex: bool):
        """The group's mask in natural order for the mask the model builds for its local frames."""
        if local_mask.num_frames != self.local_frames or local_mask.frames_per_block != self.frames_per_block:
            raise ValueError(f"the model attends over {local_mask.num_frames} local frames in blocks of "
                             f"{local_mask.frames_per_block}, the SP layout has {self.local_frames} in blocks of "
                             f"{self.frames_per_block}: re-apply the SP plan for the new layout")
        if isinstance(local_mask, TeacherForcingMask):
            real = 2 * self.num_frames * local_mask.tokens_per_frame
            return NaturalTeacherForcingMask(self.sp_size, self.local_frames, local_mask.tokens_per_frame,
                                             self.frames_per_block, padded_length(real, use_flex))
        assert isinstance(local_mask, BlockCausalMask), type(local_mask)
        # Contiguous frames in rank order: the natural order is the frame order.
        return BlockCausalMask(self.num_frames, local_mask.tokens_per_frame, self.frames_per_block)


@dataclass(frozen=True)
class NaiveLayout(_FrameLayout):
    """Rank `sp_rank`'s equal piece of the single-process `[all clean | all noisy]` sequence."""

    def __post_init__(self):
        super().__post_init__()
        require(self.sp_size % 2 == 0 and self.num_frames % (self.sp_size // 2) == 0,
                f"the naive layout needs an even SP size dividing 2 x {self.num_frames} frames into "
                f"whole-frame pieces of one half (got SP size {self.sp_size})")

    @property
    def piece_frames(self) -> int:
        return 2 * self.num_frames // self.sp_size

    @property
    def is_noisy(self) -> bool:
        return self.sp_rank * self.piece_frames >= self.num_frames

    @property
    def first_frame(self) -> int:
        """First frame of the piece within its half."""
        return self.sp_rank * self.piece_frames % self.num_frames

    @property
    def held_frames(self) -> int:
        return self.piece_frames

    def global_mask(self, tokens_per_frame: int) -> TeacherForcingMask:
        """Pieces in rank order are the single-process order: its mask applies unchanged."""
        return TeacherForcingMask(self.num_frames, tokens_per_frame, self.frames_per_block)
