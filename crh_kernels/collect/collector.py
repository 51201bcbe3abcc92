"""Collector: the facade. Life cycle, step/every, masks, subsampling, gradient scale, report, sync.

Where the rest lives: :mod:`.selection` (which layers, heads set-up, memory plan),
:mod:`.hooks` (forward and gradient hooks of weight layers, shared-input dedup),
:mod:`.attention` (per-head streams, ``nn.MultiheadAttention``), :mod:`.checkpoint`
(``state_dict`` format), :mod:`.layer` (:class:`LayerStats`), :mod:`.adapters` (rows of each
module kind), :mod:`.staging` (rows gathered into fewer kernel calls).

Data flow: forward hooks and tensor hooks → :class:`crh_kernels.Moments` (one per stream) →
backend. Nothing here computes statistics itself; :mod:`.adapters` says how each module kind
yields its rows, Moments accumulates them.

Gradients
---------
* ``g_b`` comes from a tensor hook on the module's *output* (``output.register_hook``), not from
  full backward hooks (those break on in-place activations such as ``ReLU(inplace=True)``).
  Activations are read inside the forward hook, before any later in-place op can change them.
* ``g_a`` (``g_a_source="auto"``, the default): from a tensor hook on the module's *input* when
  that input requires grad and lives in h_a's space (Linear, HF Conv1D, no bias column); else
  ``g_b @ W`` (first layer on data that needs no grad, Conv2d patches, ``include_bias=True``).
  The input hook sees the *total* gradient of the loss with respect to that tensor: where the
  input feeds other consumers too (q, k, v projections of one tensor, a residual branch) it is
  the sum over all of them, exactly the paper's ``-∂ℓ/∂h_a``. ``g_a_source="weight"`` always
  uses the layer's own share ``g_b @ W`` instead (then ``G_a = Wᵀ G_b W`` holds exactly for
  unnormalized rows, as docs/spec.md §4 assumes).
* Stored values are autograd's ``∂ℓ/∂h`` (the paper's ``g = -∂ℓ/∂h`` up to sign: the sign flips
  the mean only, which no covariance, second moment or ratio depends on).
* Scale: autograd hands hooks the gradient of the *reduced* loss. With ``normalize=True`` every
  row is scaled to unit norm, so that scale cancels and nothing is done. With
  ``normalize=False`` the collector returns per-sample gradients: for ``loss_reduction="sum"``
  they already are; for ``"mean"`` each gradient row is multiplied by N, the number of averaged
  terms, which the user states with ``loss_terms=`` (constructor) or ``col.set_loss_terms(n)``
  (per step; sticky). If never stated, N is the number of unmasked rows of that layer's call
  (right for a mean over samples = rows: MLPs, a token-mean LM loss; wrong for, e.g., a conv
  net whose loss averages over images only: then say ``set_loss_terms(batch_size)``); a warning
  says so once.
* Under ``torch.no_grad()`` / ``inference_mode`` (or when nothing requires grad) only the forward
  streams are collected; the report's meta says so. ``model.eval()`` alone changes nothing:
  gradients of an evaluation loss are collected as usual.

Samples, masks, subsampling
---------------------------
A row is a sample after flattening all leading dims (tokens, positions). A mask (``mask=`` in
the constructor, or ``col.set_mask(m)`` per batch; ``None`` clears it) is a bool tensor whose
shape is a prefix of the activations' leading dims (e.g. ``(B, T)`` for ``(B, T, D)``, ``(B,)``
for a Conv2d's ``(B, H', W')`` positions); masked rows (mask False) count nowhere, in any
stream. Rows with a zero norm (when normalizing) or a non-finite value are skipped: counted in
``Moments.n_skipped`` only. A layer whose activations do not start with the mask's shape is
collected unmasked (counted in ``LayerStats.unmasked_calls``). ``max_rows`` keeps a random
subset of at most that many rows per call (one seeded generator; the same rows for every stream
of the call).

Shared inputs
-------------
Layers whose forward receives the very same input tensor (the q, k, v projections of one
tensor), with the same kind, D_in and geometry, share one ``H_a`` Moments (and ``G_a`` when it
comes from the input hook), updated once per call, for exactly as long as they see the same
rows: a layer that later gets a tensor of its own continues on a copy, so each layer's states
always count exactly its own calls (staged rows included). Identity is ``data_ptr + shape +
stride + dtype + version`` of a tensor that is still alive; a second call of one layer on the
same tensor counts again. A layer that takes a shared tensor keeps the rows (``max_rows``) its
first taker kept, in all its streams. Rules and bookkeeping: :class:`.hooks.SharedInputs`.

Gradient checkpointing and recomputation
----------------------------------------
Under ``torch.utils.checkpoint`` every row is counted once, in every stream. Non-reentrant
(``use_reentrant=False``): the first pass is collected as usual; the recomputation during the
backward pass (any forward run while a backward runs) is not counted again. Reentrant
(``use_reentrant=True``): the first pass runs under no_grad and is counted as a forward-only
pass; its recomputation gives the gradient rows, with the rows the first pass chose, and the
pass stops being forward-only. Under ``torch.no_grad`` a checkpointed segment is an ordinary
forward-only pass.

Aborted steps
-------------
Forward rows whose gradient rows never come (an exception between forward and backward, an
output the loss does not use, a backward after ``stop()``) stay counted in H_a/H_b; the
collector counts them per layer (``LayerStats.rows_without_grad``, ``calls_without_grad``,
counted when the autograd graph of such a pass is freed) and the report's meta lists them
(``meta["rows_without_grad"]``, with a note). Holding every forward row back until its
gradient arrives would cost a copy of every activation per step; the count costs nothing.

Attention heads
---------------
``heads={name: k}`` splits a module's output (last dim) into k heads: layers
``"<name>.head<i>"`` of kind ``"head"`` with H_b and G_b only (only the forward RGA applies).
Every selected ``nn.MultiheadAttention`` gets the same for its attention output before
``out_proj``: MHA applies ``out_proj`` through ``F.linear`` with the weight, never through the
module, so :class:`.adapters.LinearSpy` watches that call during the MHA forward (which also
feeds ``<name>.out_proj`` when that Linear is selected), and the fused inference fast path of
MHA / ``nn.TransformerEncoderLayer`` is switched off while the collector runs.

Life cycle
----------
``start()``/``stop()`` or ``with col:`` add and remove the module hooks. Tensor hooks are
attached per forward call, fire once, and do nothing once the collector is stopped (a backward
after ``stop()`` adds no rows) or after a ``reset()`` or ``load_state_dict()`` (those rows
belong to the replaced states). ``load_state_dict`` is all or nothing (see there).

α over training
---------------
``alpha_every=K`` keeps :attr:`Collector.alpha_series` (:class:`.series.AlphaSeries`): at every
``step()`` that makes ``steps`` a multiple of K, the six α on covariances of every layer are
computed from the running states (the ones the report reads; no second pass over data), so the
point at step s is the report's ``alpha_cov`` at step s. The report stores the series and
draws it (``alpha_series.png``). Cost of a point: per layer, the four covariance views, WᵀW and
WWᵀ in float64 and six correlations of D×D matrices, no eigendecomposition (see
:mod:`.series`). ``reset()`` keeps the points taken so far (they are history, not rows);
``state_dict()`` carries them.

Raw moments (``raw_moments=True``)
----------------------------------
The lines of docs/spec.md §4 rest on ``H_b = W H_a Wᵀ`` and ``G_a = Wᵀ G_b W``, which hold exactly
for raw second moments (rows not normalized, not centered, bias folded in: ``h_a → (h_a, 1)``,
``W → W̃ = [W | b]``) and only roughly for the normalized covariances α uses. With
``raw_moments=True`` every layer with a weight also accumulates two raw streams: the rows
``(h_a, 1)`` (``LayerStats.H_a_raw``; the 1 where the module has a bias, whatever
``include_bias`` says) and the per-sample output gradients ``g_b`` (``LayerStats.G_b_raw``;
scaled to per-sample gradients as with ``normalize=False``: ``loss_terms``, else each call's row
count). Their uncentered second moments give the other two exactly, ``H_b = W̃ H̃_a W̃ᵀ`` and
``G̃_a = W̃ᵀ G_b W̃``, so those are not accumulated. The report then fits exponents and phases on
these raw moments (``exponent_moments: "raw"``) and shows, per layer, how far the normalized
covariances that α uses are from the same identities (``identity``). W̃ at the first raw row is
kept (``LayerStats.raw_weight0``): the report says when W changed while the raw moments
accumulated (the identities are then taken with the final W). Per-head layers have no W and
no raw streams. Cost: two more Moments per layer, ``(D_in+1)²`` and ``D_out²``: half as much
state again as the four streams, and 1.4–1.9× the collector's time per step; off by default
(measured in NOTES.md, "Raw moments").
``normalize=False, include_bias=True`` already makes H_a and G_b raw: the report uses them
without the option.

Sub-states (``blocks=K``)
-------------------------
Every stream of every layer (raw streams and heads too) is kept as K disjoint sub-states
(:class:`.blocks.BlockedMoments`); ``st.H_a`` etc. read as one Moments, the exact merge of the K
blocks (built on the first read after a change, kept until the next), so every point estimate is
the one without blocks, up to rounding. ``block_by="step"``: all rows of a collected step go to
block ``(steps // every) mod K`` (round robin: each block sees the whole run; gradient rows go to
the block of their forward pass, even after a ``step()``); one update per call per stream, as
without blocks. ``block_by="row"``: each call's rows are cut into K contiguous slices, the same
cut in every stream of the call (for one large batch). ``LayerStats.leave_one_out()`` gives K
views of the layer, view i with every state the merge of all blocks but i (the jackknife's
input). ``state_dict`` stores the blocks, ``sync`` merges block i with block i across ranks,
``reset`` clears them; ``meta["blocks"] = {"k": K, "by": ...}``. Cost: K times the memory of the
states (``memory_plan``, ``nbytes``), plus one merged state per stream while it is read and K
more once the leave-one-out views are read; a merged read costs K merges of D×D, the
leave-one-out states K·(K − 1). The row stager keeps one buffer per block (``stage_bytes``
bounds them all together).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..moments import Moments
from . import attention, checkpoint, hooks
from .blocks import BlockClock, BlockedMoments
from .layer import RAW_ATTR, STATE_ATTR, STREAMS, LayerStats, module_device
from .selection import build_layers, memory_plan
from .series import AlphaSeries
from .staging import RowStager

__all__ = ["Collector", "LayerStats", "STREAMS", "MONITOR_PRESETS"]

#: The sampling of :meth:`Collector.monitor` per preset (issue 16, "monitoring mode"): which steps
#: are collected (``every``), how many rows of each call are kept (``max_rows``) and how many
#: sub-states give the standard errors (``blocks``, round robin over the collected steps). The
#: step overhead and the α standard error of each were measured by ``bench/bench_monitor.py``
#: (NOTES.md, "Monitoring presets").
MONITOR_PRESETS: Dict[str, Dict[str, Optional[int]]] = {
    "full": {"every": 1, "max_rows": None, "blocks": 8},
    "default": {"every": 32, "max_rows": 1024, "blocks": 8},
    "light": {"every": 64, "max_rows": 256, "blocks": 8},
}


class Collector:
    """Accumulate, for every chosen layer, the moments of h_a, h_b, g_a and g_b.

    Args:
        model: the ``nn.Module`` to measure.
        modules: which layers: ``None`` (every supported layer: ``nn.Linear``, ``nn.Conv2d`` with
            groups=1, HF ``Conv1D``, and per-head streams of every ``nn.MultiheadAttention``), an
            iterable of module names (an unsupported one is an error), a regex string or compiled
            pattern (``re.search`` on the module name), or a predicate ``f(name, module) -> bool``
            (or ``f(module)``). Regexes and predicates only pick among supported layers.
        streams: subset of ``("h_a", "h_b", "g_a", "g_b")``.
        normalize: scale every row to unit norm first (the paper's default; docs/spec.md §1).
        every: collect on steps where ``steps % every == 0`` (``col.step()`` advances).
        max_rows: keep at most this many random rows per layer call (None: all).
        include_bias: ``h_a -> (h_a, 1)`` and ``W -> [W | b]`` for layers with a bias.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss that is backpropagated reduces its
            per-sample terms (only matters with ``normalize=False``; see the module doc).
        backend: Moments backend (``None``: the choice rule of :mod:`crh_kernels.backends`).
        heads: ``{module name: n_heads}``: split that module's output (last dim) into heads and
            keep H_b, G_b per head (layers ``"<name>.head<i>"``, kind ``"head"``; only the
            forward RGA applies to them). ``nn.MultiheadAttention`` modules that are selected get
            per-head streams of the attention output before ``out_proj`` automatically.
        mask: a fixed row mask (see :meth:`set_mask`).
        loss_terms: N for ``normalize=False, loss_reduction="mean"`` (see :meth:`set_loss_terms`).
        g_a_source: ``"auto"`` (input tensor hook when possible, else ``g_b @ W``) or
            ``"weight"`` (always ``g_b @ W``).
        state_dtype: dtype of the Moments states. float32 (default) is what the batch kernels
            accumulate in anyway (docs/spec.md §2: "fp32 at least"); it halves the memory of every
            state and makes each merge cheaper (the collector's overhead target needs it).
            float64 makes the cross-batch merge exact to ~1e-15 for very long accumulations.
        seed: seed of the ``max_rows`` generator.
        stage_rows: calls with fewer rows are gathered per stream until this many rows are
            there, then go through the kernel in one update (the per-call cost of an update
            grows with D², which dominates when N ≲ D); 0 updates on every call. Gathered rows
            reach the states when a buffer fills, on ``stop()``, ``report()``, ``sync()``,
            ``state_dict()`` and whenever ``col.layers`` is read.
        stage_bytes: bound on the memory of those row buffers, all streams together (the
            default holds 16 streams of 1024 fp32 features; a stream that does not fit is
            updated on every call). Masked streams add one byte a row.
        alpha_every: keep the six α of every layer every this many steps
            (:attr:`alpha_series`, module doc "α over training"); None: no series.
        raw_moments: also accumulate, per layer with a weight, the raw (unnormalized,
            uncentered, bias folded in) moments of ``(h_a, 1)`` and of the per-sample ``g_b``,
            for which ``H_b = W̃ H̃_a W̃ᵀ`` and ``G̃_a = W̃ᵀ G_b W̃`` hold exactly: the report's
            exponents and phases use them (module doc "Raw moments"). Two more states per
            layer; off by default.
        blocks: None (default), or K >= 2: keep every stream of every layer (the raw streams
            too) as K disjoint sub-states, merged exactly for every read
            (:class:`~.blocks.BlockedMoments`), so that ``LayerStats.leave_one_out()`` gives
            the merges of all blocks but one, from which the report's standard errors come
            (module doc "Sub-states"). K times the memory of the states.
        block_by: which block the rows go to: ``"step"`` (default; round robin over the
            collected steps: block ``(steps // every) mod K``) or ``"row"`` (each call's rows
            cut into K contiguous slices: for one large batch or one measurement step).
    """

    STREAMS = STREAMS
    MONITOR_PRESETS = MONITOR_PRESETS

    def __init__(self, model: nn.Module, modules=None, streams: Sequence[str] = STREAMS,
                 normalize: bool = True, every: int = 1, max_rows: Optional[int] = None,
                 include_bias: bool = False, loss_reduction: str = "mean",
                 backend: Optional[str] = None, heads: Optional[Dict[str, int]] = None,
                 mask: Optional[torch.Tensor] = None, *, loss_terms=None,
                 g_a_source: str = "auto", state_dtype: torch.dtype = torch.float32,
                 seed: int = 0, stage_rows: int = 4096, stage_bytes: int = 256 << 20,
                 alpha_every: Optional[int] = None, raw_moments: bool = False,
                 blocks: Optional[int] = None, block_by: str = "step"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        streams = tuple(streams)
        bad = [s for s in streams if s not in STREAMS]
        if bad or not streams:
            raise ValueError(f"streams must be a non-empty subset of {STREAMS}, got {streams}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int)
                                     or max_rows < 1):
            raise ValueError(f"max_rows must be a positive int or None, got {max_rows!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if g_a_source not in ("auto", "weight"):
            raise ValueError(f"g_a_source must be 'auto' or 'weight', got {g_a_source!r}")
        if state_dtype not in (torch.float32, torch.float64):
            raise TypeError(f"state_dtype must be torch.float32 or torch.float64, got {state_dtype}")
        if not isinstance(raw_moments, bool):
            raise TypeError(f"raw_moments must be a bool, got {raw_moments!r}")
        if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int)
                                   or blocks < 2):
            raise ValueError(f"blocks must be an int >= 2 or None, got {blocks!r}")
        if block_by not in ("step", "row"):
            raise ValueError(f"block_by must be 'step' or 'row', got {block_by!r}")
        self.model = model
        self.streams = tuple(s for s in STREAMS if s in streams)
        self.normalize = bool(normalize)
        self.every = every
        self.max_rows = max_rows
        self.include_bias = bool(include_bias)
        self.loss_reduction = loss_reduction
        self.backend = backend
        self.g_a_source = g_a_source
        self.state_dtype = state_dtype
        self.seed = int(seed)
        self.heads = dict(heads or {})
        self.steps = 0
        self._epoch = 0          # tensor hooks of an earlier generation (before reset/load) are inert
        self._stager, self._shared = self._new_rows(RowStager(stage_rows, stage_bytes))
        # .all (name -> LayerStats), .weight_layers (hooked by hooks.py), .groups (attention.py)
        self._layers = build_layers(model, modules, self.streams, self.heads, self.include_bias)
        self.raw_moments = raw_moments
        if raw_moments:
            for st in self._layers.weight_layers.values():
                st.enable_raw()
        self.blocks = blocks
        self.block_by = block_by
        self._clock = None if blocks is None else BlockClock(blocks, block_by,
                                                             _step_index(self))
        for st in self._layers.all.values():
            st.n_blocks = blocks
        self._handles: list = []
        self._running = False
        self._collecting = False
        self._mha = attention.MhaWatch()          # open out_proj watches, MHA fast path
        self._gen = torch.Generator().manual_seed(self.seed)
        self._mask: Optional[torch.Tensor] = None
        self._mask_cache: Dict[torch.device, torch.Tensor] = {}
        self._loss_terms = None
        self._warned_terms = False
        self._modules_arg = modules
        self._series = None if alpha_every is None else AlphaSeries(alpha_every)
        self.set_mask(mask)
        if loss_terms is not None:
            self.set_loss_terms(loss_terms)

    @classmethod
    def monitor(cls, model: nn.Module, preset: str = "default", **kwargs) -> "Collector":
        """A collector for watching a long training run: the sampling of ``preset`` (one of
        :data:`MONITOR_PRESETS`: ``"light"``, ``"default"``, ``"full"``; ``every``, ``max_rows``
        and ``blocks``, round robin over the collected steps, so that the report carries
        standard errors), every other argument as for :class:`Collector`; any keyword given
        overrides the preset's. Start it and call ``step()`` once per training step as usual.

        The presets trade the time added to each training step against the α standard error
        of the report; ``bench/bench_monitor.py`` measures both (NOTES.md, "Monitoring
        presets", and docs/usage.md, "Monitoring a long run")."""
        if preset not in MONITOR_PRESETS:
            raise ValueError(f"preset must be one of {sorted(MONITOR_PRESETS)}, got {preset!r}")
        cfg = dict(MONITOR_PRESETS[preset])
        cfg.update(kwargs)
        return cls(model, **cfg)

    # ---------------------------------------------------------------- memory
    def memory_plan(self, model: Optional[nn.Module] = None) -> List[Tuple[str, str, Optional[tuple], int]]:
        """``[(layer name, stream, state shape, bytes)]`` from module shapes alone (nothing needs
        to have run). Shared inputs are counted per layer (an upper bound); a heads split of a
        module whose width cannot be read from its attributes has shape None and 0 bytes."""
        if model is not None and model is not self.model:
            other = Collector(model, self._modules_arg, self.streams, self.normalize,
                              include_bias=self.include_bias, heads=self.heads,
                              state_dtype=self.state_dtype, raw_moments=self.raw_moments,
                              blocks=self.blocks)
            return other.memory_plan()
        return memory_plan(self._layers.all, self.state_dtype, self.blocks or 1)

    @classmethod
    def estimate_bytes(cls, model: nn.Module, modules=None, streams: Sequence[str] = STREAMS,
                       include_bias: bool = False, heads: Optional[Dict[str, int]] = None,
                       state_dtype: torch.dtype = torch.float32, raw_moments: bool = False,
                       blocks: Optional[int] = None) -> int:
        """Total bytes of the Moments states a Collector with these arguments would hold
        (``blocks=K``: K sub-states per stream)."""
        col = cls(model, modules, streams, include_bias=include_bias, heads=heads,
                  state_dtype=state_dtype, raw_moments=raw_moments, blocks=blocks)
        return sum(b for *_, b in col.memory_plan())

    def nbytes(self) -> int:
        """Bytes held now by the Moments states (shared ones counted once; with ``blocks=K``
        the K sub-states of each, not the merged views built on read)."""
        return sum(m.nbytes() for m in self._unique_moments())

    # ------------------------------------------------------------- life cycle
    def start(self) -> "Collector":
        """Register the hooks (idempotent). If the model holds an ``nn.MultiheadAttention``, the
        fused inference fast path of MHA / ``nn.TransformerEncoderLayer`` (which bypasses module
        hooks and ``out_proj``) is switched off until :meth:`stop`."""
        if self._running:
            return self
        self._mha.switch_fastpath_off(self.model)
        for st in self._layers.weight_layers.values():
            self._handles.append(st.module.register_forward_hook(hooks.forward_hook(self, st),
                                                                 with_kwargs=True))
        for grp in self._layers.groups.values():
            self._handles.extend(attention.register(self, grp))
        self._running = True
        self._update_collecting()
        return self

    def stop(self) -> "Collector":
        """Remove every hook. Tensor hooks already attached to live tensors become inert."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._mha.close()
        self._running = False
        self._update_collecting()
        self._stager.flush()
        self._shared.new_step()
        return self

    def __enter__(self) -> "Collector":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def step(self) -> int:
        """Advance the step counter that ``every`` uses; returns the new count."""
        self.steps += 1
        self._shared.new_step()
        self._update_collecting()
        if self._series is not None and self._series.due(self.steps):
            self._series.record(self.steps, self.layers)
        return self.steps

    @property
    def alpha_series(self) -> Optional[AlphaSeries]:
        """The six α per layer every ``alpha_every`` steps (None without ``alpha_every``)."""
        return self._series

    @property
    def layers(self) -> Dict[str, LayerStats]:
        """name -> LayerStats, with every gathered row already in its state."""
        self._stager.flush()
        return self._layers.all

    def flush(self) -> "Collector":
        """Put the rows gathered by staging into their states (reading ``layers`` does it too)."""
        self._stager.flush()
        return self

    def _update_collecting(self) -> None:
        self._collecting = self._running and (self.steps % self.every == 0)

    @property
    def collecting(self) -> bool:
        """Whether a forward pass now would be collected."""
        return self._collecting

    # ------------------------------------------------------ masks and scales
    def set_mask(self, mask: Optional[torch.Tensor]) -> None:
        """Row mask for the following forward passes (bool; shape a prefix of the activations'
        leading dims, e.g. ``(B, T)``); ``None`` clears it. Masked rows (False) count nowhere."""
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor or None, got "
                                f"{getattr(mask, 'dtype', type(mask).__name__)}")
            if mask.dim() < 1:
                raise ValueError("mask must have at least one dimension")
        self._mask = mask
        self._mask_cache = {} if mask is None else {mask.device: mask}

    def set_loss_terms(self, n) -> None:
        """N, the number of terms the loss averages (``normalize=False, loss_reduction="mean"``):
        gradient rows are multiplied by N to give per-sample gradients. An int, a 0-d tensor
        (e.g. ``mask.sum()``, no host sync), or None to fall back to the row count."""
        if n is not None and not isinstance(n, torch.Tensor):
            if isinstance(n, bool) or not isinstance(n, (int, float)) or n <= 0:
                raise ValueError(f"loss terms must be a positive number, got {n!r}")
        self._loss_terms = n

    # The row policy and the Moments factory below are what :mod:`.hooks` and :mod:`.attention`
    # call on the collector (each of those modules lists everything it uses).
    def _row_mask(self, lead: Tuple[int, ...], device: torch.device, st: Optional[LayerStats]):
        """The flattened mask of a call whose rows have leading dims ``lead`` (None: unmasked;
        a mask that does not fit ``lead`` counts in ``st.unmasked_calls``)."""
        m = self._mask
        if m is None:
            return None
        k = m.dim()
        if k > len(lead) or tuple(m.shape) != tuple(lead[:k]):
            if st is not None:
                st.unmasked_calls += 1
            return None
        md = self._mask_cache.get(device)
        if md is None:
            md = m.to(device)
            self._mask_cache[device] = md
        if k < len(lead):
            md = md.reshape(tuple(md.shape) + (1,) * (len(lead) - k)).expand(lead)
        return md.reshape(-1)

    def _subsample(self, r: int, device: torch.device):
        """Indices of the ``max_rows`` rows kept out of ``r`` (None: keep all)."""
        if self.max_rows is None or r <= self.max_rows:
            return None
        idx = torch.randperm(r, generator=self._gen)[: self.max_rows]
        return idx.to(device, non_blocking=True)

    def _grad_scale(self, terms, raw: bool = False):
        """Factor turning autograd's rows into per-sample gradients (None: leave them as they are).
        ``terms = (rows of the call, its full mask or None)`` gives the default N. ``raw``: for
        the raw streams, which are never normalized (the warning about N is the
        ``normalize=False`` one only)."""
        if (self.normalize and not raw) or self.loss_reduction == "sum":
            return None
        if raw and self.normalize:
            if self._loss_terms is not None:
                return self._loss_terms
            r, mask = terms
            return r if mask is None else mask.sum()
        if self._loss_terms is not None:
            return self._loss_terms
        if not self._warned_terms:
            self._warned_terms = True
            warnings.warn("Collector(normalize=False, loss_reduction='mean'): the number of averaged "
                          "loss terms was not given; gradient rows are multiplied by each call's "
                          "row count. Call col.set_loss_terms(n) if the loss averages over anything "
                          "else (e.g. images of a conv net)", UserWarning, stacklevel=2)
        r, mask = terms
        return r if mask is None else mask.sum()

    def _moments(self, st: LayerStats, stream: str, dim: int, device) -> Moments:
        """The Moments of ``st``'s stream (a raw stream too: never normalized), made on first
        use (a :class:`~.blocks.BlockedMoments` of K blocks with ``blocks=K``)."""
        attr = STATE_ATTR.get(stream) or RAW_ATTR[stream]
        m = getattr(st, attr)
        if m is None:
            normalize = self.normalize and stream in STATE_ATTR
            if self._clock is not None:
                m = BlockedMoments.new(dim, self._clock, normalize=normalize, device=device,
                                       backend=self.backend, dtype=self.state_dtype)
            else:
                m = Moments(dim, normalize=normalize, device=device, backend=self.backend,
                            dtype=self.state_dtype)
            setattr(st, attr, m)
        return m

    def _block_now(self) -> Optional[int]:
        """The sub-state block of a call made now (``block_by="step"``), else None."""
        return None if self._clock is None else self._clock.now

    def _unique_moments(self, create: bool = False) -> List[Moments]:
        out, seen = [], set()
        for st in self._layers.all.values():
            dims = dict(st.dims)
            dims.update(st.raw_dims)
            for s in st.streams + tuple(st.raw_dims):
                m = getattr(st, STATE_ATTR.get(s) or RAW_ATTR[s])
                if m is None and create and s in dims:
                    dev = module_device(st.module) or torch.device("cpu")
                    m = self._moments(st, s, dims[s], dev)
                if m is not None and id(m) not in seen:
                    seen.add(id(m))
                    out.append(m)
        return out

    # ------------------------------------------------------------- reporting
    def report(self, *, floor: float = 1e-6, tol: float = 0.25, kind: str = "cov", **kwargs):
        """A :class:`crh_kernels.report.Report` of every layer (see there)."""
        from ..report import Report
        return Report.from_collector(self, floor=floor, tol=tol, kind=kind, **kwargs)

    def sync(self, group=None, *, timeout=None) -> None:
        """Exact all-reduce of every Moments (shared ones once) across ``group``'s ranks.

        A collective: every rank calls it with the same layers. Each state goes with its name
        (``"<layer>.<H_a|H_b|G_a|G_b>"``; a shared state under its first owner), so layers
        listed in a different order on two ranks raise ``RuntimeError`` on every rank instead
        of being merged crosswise. ``timeout`` (``datetime.timedelta`` or seconds; ``None``:
        the group's own) bounds the wait for each collective, so a rank that fails during the
        sync makes the others raise instead of hanging. Staged rows are flushed into the local
        states first; after that the sync is all or nothing (a failure changes no state). See
        :func:`crh_kernels.distributed.all_reduce_moments` and docs/distributed.md."""
        from ..distributed import all_reduce_moments
        self._stager.flush()
        states = self._unique_moments(create=True)
        names = {}
        for st in self._layers.all.values():
            for s in st.streams + tuple(st.raw_dims):
                attr = STATE_ATTR.get(s) or RAW_ATTR[s]
                m = getattr(st, attr)
                if m is not None:
                    names.setdefault(id(m), f"{st.name}.{attr}")
        flat, flat_names = [], []
        for m in states:
            if isinstance(m, BlockedMoments):     # block i with block i of every rank
                flat.extend(m.blocks)
                flat_names.extend(f"{names[id(m)]}.block{i}" for i in range(m.k))
            else:
                flat.append(m)
                flat_names.append(names[id(m)])
        all_reduce_moments(flat, group=group, names=flat_names, timeout=timeout)

    def reset(self) -> None:
        """Forget all rows (states, shared-input aliases, counters) but keep hooks and config.
        Gradient hooks of forward passes made before the reset add nothing."""
        self._epoch += 1
        self._stager, self._shared = self._new_rows(self._stager)
        for st in self._layers.all.values():
            st.clear()

    @staticmethod
    def _new_rows(like: RowStager, keep=()) -> Tuple[RowStager, "hooks.SharedInputs"]:
        """A row stager configured as ``like``, holding ``like``'s rows for the Moments in
        ``keep`` only, and its shared-input tracker."""
        stager = RowStager(like.rows, like.max_bytes)
        stager.adopt(like, keep)
        shared = hooks.SharedInputs(stager)
        stager.before_flush = shared.resolve_all
        return stager, shared

    @property
    def meta(self) -> dict:
        """Configuration and what was (not) collected, for reports."""
        layers = self._layers.all.values()
        fwd = sum((st.H_a.n if st.H_a is not None else 0) + (st.H_b.n if st.H_b is not None else 0)
                  for st in layers)
        grad = sum((st.G_a.n if st.G_a is not None else 0) + (st.G_b.n if st.G_b is not None else 0)
                   for st in layers)
        wanted_grad = any(s in self.streams for s in ("g_a", "g_b"))
        notes = []
        forward_only = bool(fwd > 0 and grad == 0)
        if not wanted_grad:
            notes.append("forward streams only: gradient streams were not requested")
        elif forward_only:
            notes.append("forward streams only: every collected pass ran without gradients "
                         "(torch.no_grad / inference_mode, or nothing required grad); G_a, G_b "
                         "and every relation that needs them are missing")
        if any(st.kind == "head" for st in layers):
            notes.append("per-head layers have only h_b and g_b: only the forward RGA applies")
        partial = [st.name for st in layers if st.forward_only_calls and st.grad_calls]
        if partial:
            notes.append(f"{len(partial)} layer(s) also saw passes without gradients (their "
                         f"forward streams include rows that have no gradient rows)")
        lost = {st.name: st.rows_without_grad for st in layers if st.calls_without_grad}
        lost = {k: v for k, v in lost.items() if v}
        if lost:
            notes.append(f"{len(lost)} layer(s) counted forward rows whose gradients never came "
                         f"({sum(lost.values())} rows in all: a step aborted between forward and "
                         f"backward, an output the loss did not use, or a backward after stop()); "
                         f"their h streams hold that many rows more than their g streams "
                         f"(meta['rows_without_grad'])")
        unmasked = [st.name for st in layers if st.unmasked_calls]
        if unmasked:
            notes.append("the mask did not match the activations of: " + ", ".join(unmasked[:8])
                         + (" ..." if len(unmasked) > 8 else "") + " (collected unmasked)")
        return {
            "steps": self.steps, "every": self.every, "streams": list(self.streams),
            "normalize": self.normalize, "max_rows": self.max_rows,
            "include_bias": self.include_bias, "loss_reduction": self.loss_reduction,
            "g_a_source": self.g_a_source, "forward_only": forward_only,
            "rows_without_grad": lost, "notes": notes,
            "alpha_every": None if self._series is None else self._series.every,
            "raw_moments": self.raw_moments,
            "blocks": None if self._clock is None else self._clock.config(),
        }

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to resume without loss: every Moments (shared ones once, others
        as aliases), the step count, the ``max_rows`` generator and the configuration
        (format: :mod:`.checkpoint`)."""
        self._stager.flush()
        config = {"streams": list(self.streams), "normalize": self.normalize,
                  "every": self.every, "max_rows": self.max_rows,
                  "include_bias": self.include_bias, "loss_reduction": self.loss_reduction,
                  "g_a_source": self.g_a_source, "raw_moments": self.raw_moments,
                  "blocks": None if self._clock is None else self._clock.config()}
        sd = checkpoint.state_dict(self._layers.all, self.steps, self._gen.get_state(), config)
        if self._series is not None:
            sd["alpha_series"] = self._series.to_dict()
        return sd

    def load_state_dict(self, sd: dict, strict: bool = True) -> None:
        """Restore :meth:`state_dict` output into this collector (same model structure).

        All or nothing: everything is checked and every new state built first (a bad file
        raises a one-line error naming the field, and the collector is as it was, rows staged
        for later updates included); then the new states replace the old ones together, and an
        interruption at any point (KeyboardInterrupt included) puts the old ones back. Rows
        gathered for the replaced states are dropped with them; gradient hooks of forward
        passes made before the restore add nothing. ``strict=False``: layers present on one
        side only are left out (those of this collector keep their states and staged rows).
        With ``alpha_every``, the α series is replaced by the state dict's (emptied when it has
        none; a series taken every other number of steps is an error)."""
        self._shared.resolve_all()   # a restore between the calls of layers sharing an input
        plan = checkpoint.plan_restore(self._layers.all, sd, strict, normalize=self.normalize,
                                       include_bias=self.include_bias, backend=self.backend,
                                       raw_moments=self.raw_moments, clock=self._clock)
        series = self._series
        if series is not None:
            series = AlphaSeries(series.every)
            if sd.get("alpha_series") is not None:
                series = AlphaSeries.from_dict(sd["alpha_series"], "state dict")
                if series.every != self._series.every:
                    raise ValueError(f"alpha_series was taken every {series.every} steps, this "
                                     f"collector has alpha_every={self._series.every}")
        gen = torch.Generator()
        gen.set_state(plan.rng)
        kept = [m for st in self._layers.all.values() if st not in plan.layers
                for m in (*st.moments().values(), *st.raw_moments().values()) if m is not None]
        stager, shared = self._new_rows(self._stager, keep=kept)
        old = checkpoint.snapshot(self._layers.all.values())
        old_top = (self.steps, self._gen, self._stager, self._shared, self._epoch,
                   self._collecting, self._series)
        try:
            self._epoch += 1             # first: hooks of earlier passes are inert from here
            checkpoint.apply(plan)
            shared.adopt(self._layers.all.values())
            self.steps, self._gen, self._stager, self._shared = plan.steps, gen, stager, shared
            self._series = series
            self._update_collecting()
        except BaseException:
            checkpoint.restore(old)
            (self.steps, self._gen, self._stager, self._shared, self._epoch,
             self._collecting, self._series) = old_top
            raise

    def __repr__(self) -> str:
        kinds = {}
        for st in self._layers.all.values():
            kinds[st.kind] = kinds.get(st.kind, 0) + 1
        return (f"Collector({len(self._layers.all)} layers {kinds}, streams={self.streams}, "
                f"steps={self.steps}, every={self.every}, running={self._running})")


def _step_index(col: Collector):
    """``steps // every`` of ``col`` (None once it is gone), for its :class:`BlockClock`: the
    states would otherwise keep the collector alive."""
    ref = weakref.ref(col)

    def index():
        c = ref()
        return None if c is None else c.steps // c.every
    return index
