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
    budget: int = 0  # tokens to add by the probe's ranking (0: no probe pass)
    check_layer: int = 1  # key: the check layer; value: the last of check layers 1..L; query: last layer run
    gaps: tuple[int, ...] = ()  # uncached non-chunk positions inside the region (always computed)
    signal: str = "key"  # what the probe ranks by: "key" | "value" (staged, CacheBlend) | "query"
    keeps: tuple[int, ...] = ()  # value: candidates kept after each check layer 1..L (the last is budget)
    ape: tuple[float, float] | None = None  # APE policies: (temperature, scale) of the extend's chunk attention

    def ape_rows(self):
        """The APE setting of this request's extend rows (amem_sgl.blend.ape.ApeRows), or None."""
        return (*self.ape, self.segments) if self.ape is not None else None

    def probe_positions(self) -> list[int]:
        """Every spliced chunk token and gap token, ascending: a probe computes the early layers of
        all of them (a gap has no KV at all until it is computed)."""
        return sorted({p for start, length in self.segments for p in range(start, start + length)} | set(self.gaps))

    def candidates(self) -> list[int]:
        """Spliced chunk positions the probe may add (not fixed, not gaps), ascending."""
        fixed = set(self.positions) | set(self.gaps)
        return [p for p in self.probe_positions() if p not in fixed]

    def with_deviation(self, deviation: torch.Tensor) -> "BlendPlan":
        """The plan with the ``budget`` highest-deviation probe tokens added to its positions
        (``deviation``: one score per :meth:`probe_positions` entry)."""
        return self.with_picked(top_positions(self.probe_positions(), deviation, self.candidates(), self.budget))

    def with_picked(self, picked) -> "BlendPlan":
        """The plan with ``picked`` (spliced positions) added to its positions, the probe done."""
        chosen = sorted(set(self.positions) | set(self.gaps) | set(picked))
        return dataclasses.replace(self, positions=tuple(chosen), budget=0, keeps=())


def top_positions(rows: list[int], scores: torch.Tensor, among, k: int) -> list[int]:
    """The ``k`` positions of ``among`` with the highest score, ascending; ``scores[i]`` belongs to
    position ``rows[i]`` (positions of ``rows`` outside ``among`` never win)."""
    allowed = set(among)
    score = scores.float().clone()
    score[[i for i, p in enumerate(rows) if p not in allowed]] = float("-inf")
    k = min(k, sum(1 for p in rows if p in allowed))
    return sorted(rows[i] for i in torch.topk(score, k).indices.tolist()) if k > 0 else []


@dataclasses.dataclass
class BlendContext:
    """One extra forward of a batch: scattered tokens at their true positions over their rows.

    * blend pass (``probe_layer`` None): every layer stores the tokens' fresh KV over the spliced
      copies, then attends causally by position over each row's first ``seq_lens[i]`` slots;
    * probe pass: layers below ``probe_layer`` do the same; at ``probe_layer`` the seam records each
      token's key deviation (fresh key vs the key in its slot, before anything is stored) into
      ``deviation`` -- the value deviation with ``signal="value"`` -- and stores nothing (or, with
      ``store_probe``, the tokens' fresh KV at that layer); layers above it are not run (the runner
      truncates the model's layer range) or, where a model cannot be truncated, skip attention and
      store nothing;
    * query probe (``score_from`` set): a blend pass over ``query_layers`` layers whose rows at
      positions ``>= score_from[i]`` (sequence i's question) also add, at every layer, their
      softmax attention to each key position (summed over heads and question rows) into
      ``attention_mass[i]`` ([seq_lens[i]], fp32);
    * APE (``ape`` set): one entry per sequence the seam serves (a folded pass's parts, else the
      forward batch's requests): None, or (temperature, scale, chunk spans) -- that sequence's rows
      attend to its chunk spans by amem_sgl.blend.ape's rule (after the plain attention is computed).
    """

    kernel: str = "torch"  # "torch" (CPU: linear-cost SDPA by position) | "triton" (kernels.blend_attention)
    probe_layer: int | None = None
    deviation: torch.Tensor | None = None  # [tokens] set by the probe layer
    layers_attended: list[int] = dataclasses.field(default_factory=list)  # layer ids the seam served
    kv_slots: torch.Tensor | None = None  # per batch: every row's slots, concatenated (first use)
    signal: str = "key"  # probe: "key" | "value" deviation at probe_layer
    store_probe: bool = False  # probe: store the fresh KV at probe_layer too
    query_layers: int | None = None  # query probe: layers run (the model's range cut there)
    score_from: list[int] | None = None  # query probe: per sequence, the first position of its question
    attention_mass: list[torch.Tensor] | None = None  # query probe: per sequence, mass per key position
    fold: "FoldRows | None" = None  # folded blend pass: the batch's own extend also recomputes the plan tokens
    ape: list | None = None  # APE: per sequence served, None or (temperature, scale, spans)
    extend_plan: tuple | None = None  # (forward batch key, attention.ExtendPlan): made at the first layer
    triton_checked: int | None = None  # CUDA: blend_attention's arguments checked at the first layer; longest q

    def layers_run(self) -> int | None:
        """How many decoder layers this forward runs (None: all)."""
        return self.probe_layer + 1 if self.probe_layer is not None else self.query_layers

    def row_slots(self, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                  seq_lens: torch.Tensor) -> torch.Tensor:
        """Slots of every sequence's keys, concatenated (the same for every layer: computed once)."""
        if self.kv_slots is None:
            lens = seq_lens.tolist()
            self.kv_slots = torch.cat([req_to_token[int(r), :n] for r, n in zip(req_pool_indices.tolist(), lens)]
                                      ).to(torch.int64)
        return self.kv_slots


@dataclasses.dataclass
class FoldRows:
    """A blend pass folded into the batch's own extend forward (amem_sgl.blend.runner.fold_batch).

    Every request's rows are its recomputed tokens (at their true positions, over the first ``end``
    slots of its row, as a separate blend pass computes them), then its own extend tokens (over its
    whole row, as the stock extend computes them). The attention seam serves each part as its own
    sequence -- the same query rows over the same keys as the two forwards it replaces -- so the
    recomputed KV and the extend's logits are those of a blend pass followed by the extend.

    * ``positions`` [tokens]: every row's position, set on the forward batch before the model runs
      (the attention seam's ``init_forward_metadata``: SGLang computes contiguous extend positions);
    * ``req_pool_indices`` / ``seq_lens`` / ``prefix_lens`` / ``extend_lens``: one entry per part
      (a request without a plan has one part), in row order, on the CPU."""

    positions: torch.Tensor
    req_pool_indices: torch.Tensor
    seq_lens: torch.Tensor
    prefix_lens: torch.Tensor
    extend_lens: torch.Tensor
    positions_set: bool = False  # the seam's init_forward_metadata put ``positions`` on the batch
    ape: list | None = None  # per part: None or the request's APE setting (its extend part only)


def key_deviation(k_new: torch.Tensor, k_cached: torch.Tensor) -> torch.Tensor:
    """Per-token sum over heads and dims of (k_new - k_cached)^2, in fp32 (keys or values alike)."""
    diff = k_new.reshape(k_cached.shape[0], -1).float() - k_cached.reshape(k_cached.shape[0], -1).float()
    return diff.pow(2).sum(dim=-1)
