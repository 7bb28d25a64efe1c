"""What a blend pass needs, in two objects: a request's :class:`BlendPlan` (made by the cache at
admission) and a batch's :class:`BlendContext` (one blend or probe forward of a batch, handed to the
attention seam for that forward: ``AmemAttnBackend.serving(ctx)``).

Nothing here is global or thread-local: the cache keeps the plans of admitted requests until their
batch runs (``ChunkRadixCache.take_blend_plans``), the runner builds one context per extra forward,
and the attention seam (amem_sgl.blend.backend) serves that forward with it.
"""

from __future__ import annotations

import dataclasses

import torch

@dataclasses.dataclass(frozen=True)
class BlendPlan:
    end: int  # end of the spliced region (the request's prefix length)
    positions: tuple[int, ...]  # ascending positions to recompute, all < end
    segments: tuple[tuple[int, int], ...] = ()  # spliced chunks (start, length): the probe's tokens
    budget: int = 0  # tokens to add by key deviation at check_layer (0: no probe pass)
    check_layer: int = 1
    gaps: tuple[int, ...] = ()  # uncached non-chunk positions inside the region (always computed)

    def probe_positions(self) -> list[int]:
        """Every spliced chunk token and gap token, ascending: a probe computes the early layers of
        all of them (a gap has no KV at all until it is computed)."""
        return sorted({p for start, length in self.segments for p in range(start, start + length)} | set(self.gaps))

    def with_deviation(self, deviation: torch.Tensor) -> "BlendPlan":
        """The plan with the ``budget`` highest-deviation probe tokens added to its positions."""
        probe = self.probe_positions()
        fixed = set(self.positions) | set(self.gaps)
        score = deviation.float().clone()
        score[[i for i, p in enumerate(probe) if p in fixed]] = float("-inf")
        top = torch.topk(score, min(self.budget, len(probe) - len(fixed))).indices.tolist()
        chosen = sorted(fixed | {probe[i] for i in top})
        return dataclasses.replace(self, positions=tuple(chosen), budget=0)


@dataclasses.dataclass
class BlendContext:
    """One extra forward of a batch: scattered tokens at their true positions over their rows.

    * blend pass (``probe_layer`` None): every layer stores the tokens' fresh KV over the spliced
      copies, then attends causally by position over each row's first ``seq_lens[i]`` slots;
    * probe pass: layers below ``probe_layer`` do the same; at ``probe_layer`` the seam records each
      token's key deviation (fresh key vs the key in its slot, before anything is stored) into
      ``deviation`` and stores nothing; layers above it are not run (the runner truncates the
      model's layer range) or, where a model cannot be truncated, skip attention and store nothing.
    """

    kernel: str = "torch"  # "torch" (CPU: linear-cost SDPA by position) | "triton" (kernels.blend_attention)
    probe_layer: int | None = None
    deviation: torch.Tensor | None = None  # [tokens] set by the probe layer
    layers_attended: list[int] = dataclasses.field(default_factory=list)  # layer ids the seam served
    kv_slots: torch.Tensor | None = None  # per batch: every row's slots, concatenated (first use)

    def row_slots(self, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                  seq_lens: torch.Tensor) -> torch.Tensor:
        """Slots of every sequence's keys, concatenated (the same for every layer: computed once)."""
        if self.kv_slots is None:
            lens = seq_lens.tolist()
            self.kv_slots = torch.cat([req_to_token[int(r), :n] for r, n in zip(req_pool_indices.tolist(), lens)]
                                      ).to(torch.int64)
        return self.kv_slots


def key_deviation(k_new: torch.Tensor, k_cached: torch.Tensor) -> torch.Tensor:
    """Per-token sum over heads and dims of (k_new - k_cached)^2, in fp32."""
    diff = k_new.reshape(k_cached.shape[0], -1).float() - k_cached.reshape(k_cached.shape[0], -1).float()
    return diff.pow(2).sum(dim=-1)
