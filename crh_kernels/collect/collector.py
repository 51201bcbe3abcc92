"""Collector: module selection, hook life cycle, step/every, masks, gradient scale, checkpoints.

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
  unnormalized rows, as SPEC §4 assumes).
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
for a Conv2d's ``(B, H', W')`` positions); False rows count nowhere, in any stream. A layer whose
activations do not start with the mask's shape is collected unmasked (counted in
``LayerStats.unmasked_calls``). ``max_rows`` keeps a random subset of at most that many rows per
call (one seeded generator; the same rows for every stream of the call).

Shared inputs
-------------
Layers whose forward receives the very same input tensor within a step (the q, k, v projections
of one tensor), with the same kind, D_in and geometry, share one ``H_a`` Moments (and ``G_a``
when it comes from the input hook): it is updated once per call. Identity is
``data_ptr + shape + stride + dtype + version`` of a tensor that is still alive.

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
after ``stop()`` adds no rows).
"""
from __future__ import annotations

import inspect
import re
import warnings
import weakref
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..moments import Moments
from .adapters import Adapter, LinearSpy, adapter_for, head_dim_of
from .staging import RowStager

__all__ = ["Collector", "LayerStats", "STREAMS"]

STREAMS = ("h_a", "h_b", "g_a", "g_b")
_ATTR = {"h_a": "H_a", "h_b": "H_b", "g_a": "G_a", "g_b": "G_b"}
_FORMAT = "crh_kernels.Collector/1"


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    return None


def _hook_once(t: torch.Tensor, fn) -> None:
    """``t.register_hook(fn)`` that removes itself after its first call: one forward call gives
    one set of gradient rows, even for a tensor that outlives the pass (a leaf input that takes
    part in later backward passes) or a graph backpropagated twice (``retain_graph=True``)."""
    box = []

    def once(g):
        if box:
            box.pop().remove()
            return fn(g)
        return None

    box.append(t.register_hook(once))


def _module_device(module: nn.Module) -> Optional[torch.device]:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return None


class LayerStats:
    """The four streams of one measured layer (or one attention head).

    Attributes:
        name: key in ``Collector.layers`` (heads: ``"<module name>.head<i>"``).
        module: the ``nn.Module`` measured (heads: the module whose output is split, or the
            ``nn.MultiheadAttention``).
        kind: ``"linear"``, ``"conv2d"``, ``"conv1d"`` or ``"head"``.
        H_a, H_b, G_a, G_b: :class:`~crh_kernels.Moments` of h_a, h_b, g_a, g_b, or None (stream
            not requested, not applicable, or no row seen yet). Heads only have H_b and G_b.
        parent, head: for heads, the module name and the head index (else None).
        dims: ``{stream: D}`` of the streams this layer can have (h_a includes a bias column
            when ``include_bias``).
        shared: ``{stream: owner layer name}`` for an H_a/G_a shared with another layer.
        forward_calls, grad_calls, forward_only_calls, unmasked_calls: bookkeeping counters.
    """

    def __init__(self, name: str, module: nn.Module, kind: str, adapter: Optional[Adapter],
                 streams: Sequence[str], dims: Dict[str, int], bias_col: bool,
                 parent: Optional[str] = None, head: Optional[int] = None):
        self.name = name
        self.module = module
        self.kind = kind
        self.adapter = adapter
        self.streams = tuple(streams)
        self.dims = dict(dims)
        self.bias_col = bool(bias_col)
        self.parent = parent
        self.head = head
        self.H_a: Optional[Moments] = None
        self.H_b: Optional[Moments] = None
        self.G_a: Optional[Moments] = None
        self.G_b: Optional[Moments] = None
        self.shared: Dict[str, str] = {}
        self.forward_calls = 0
        self.grad_calls = 0
        self.forward_only_calls = 0
        self.unmasked_calls = 0

    # ------------------------------------------------------------------ views
    def moments(self) -> Dict[str, Optional[Moments]]:
        """``{stream: Moments or None}`` for the four streams."""
        return {s: getattr(self, _ATTR[s]) for s in STREAMS}

    def weight(self) -> Optional[torch.Tensor]:
        """The layer's ``(D_out, D_in)`` matrix W (bias column appended when the collector has
        ``include_bias=True`` and the module has a bias), detached; None for heads."""
        if self.adapter is None:
            return None
        return self.adapter.weight(self.module, self.bias_col)

    def Z_a(self) -> Optional[torch.Tensor]:
        """WᵀW (D_in×D_in) in float64, or None for heads."""
        w = self._weight64()
        return None if w is None else w.t() @ w

    def Z_b(self) -> Optional[torch.Tensor]:
        """WWᵀ (D_out×D_out) in float64, or None for heads."""
        w = self._weight64()
        return None if w is None else w @ w.t()

    def _weight64(self) -> Optional[torch.Tensor]:
        w = self.weight()
        if w is None:
            return None
        return (w.cpu() if w.device.type == "mps" else w).double()   # MPS has no float64

    def __repr__(self) -> str:
        ns = {s: (m.n if m is not None else None) for s, m in self.moments().items()}
        return f"LayerStats({self.name!r}, kind={self.kind!r}, n={ns})"


class _HeadGroup:
    """The per-head LayerStats of one module (heads= entry or nn.MultiheadAttention)."""

    def __init__(self, name: str, module: nn.Module, n_heads: int, mha: bool):
        self.name = name
        self.module = module
        self.n_heads = int(n_heads)
        self.mha = mha
        self.layers: List[LayerStats] = []


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
        normalize: scale every row to unit norm first (the paper's default; SPEC §1).
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
            accumulate in anyway (SPEC §2: "fp32 at least"); it halves the memory of every
            state and makes each merge ~4x cheaper (the collector's overhead target needs it).
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
    """

    STREAMS = STREAMS

    def __init__(self, model: nn.Module, modules=None, streams: Sequence[str] = STREAMS,
                 normalize: bool = True, every: int = 1, max_rows: Optional[int] = None,
                 include_bias: bool = False, loss_reduction: str = "mean",
                 backend: Optional[str] = None, heads: Optional[Dict[str, int]] = None,
                 mask: Optional[torch.Tensor] = None, *, loss_terms=None,
                 g_a_source: str = "auto", state_dtype: torch.dtype = torch.float32,
                 seed: int = 0, stage_rows: int = 4096, stage_bytes: int = 256 << 20):
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
        self._stager = RowStager(stage_rows, stage_bytes)
        self._layers: Dict[str, LayerStats] = {}
        self._groups: Dict[str, _HeadGroup] = {}
        self._linear: Dict[str, LayerStats] = {}       # module name -> LayerStats (non-head)
        self._skipped: Dict[str, str] = {}
        self._handles: list = []
        self._running = False
        self._collecting = False
        self._seen: Dict[tuple, tuple] = {}
        self._gen = torch.Generator().manual_seed(self.seed)
        self._mask: Optional[torch.Tensor] = None
        self._mask_cache: Dict[torch.device, torch.Tensor] = {}
        self._loss_terms = None
        self._warned_terms = False
        self._mha_state: Dict[int, tuple] = {}
        self._fastpath_prev: Optional[bool] = None
        self._modules_arg = modules
        self._build(model, modules)
        self.set_mask(mask)
        if loss_terms is not None:
            self.set_loss_terms(loss_terms)

    # -------------------------------------------------------------- selection
    @staticmethod
    def _select(model: nn.Module, modules) -> List[Tuple[str, nn.Module]]:
        named = [(n, m) for n, m in model.named_modules() if n != "" or m is model]
        supported = lambda m: isinstance(m, nn.MultiheadAttention) or adapter_for(m)[0] is not None
        if modules is None:
            return [(n, m) for n, m in named if supported(m)]
        if isinstance(modules, (str, re.Pattern)):
            pat = re.compile(modules) if isinstance(modules, str) else modules
            return [(n, m) for n, m in named if supported(m) and pat.search(n)]
        if callable(modules):
            try:
                nparams = len(inspect.signature(modules).parameters)
            except (TypeError, ValueError):
                nparams = 2
            call = (lambda n, m: modules(n, m)) if nparams >= 2 else (lambda n, m: modules(m))
            return [(n, m) for n, m in named if supported(m) and call(n, m)]
        if isinstance(modules, Iterable):
            table = dict(named)
            out = []
            for n in modules:
                if not isinstance(n, str):
                    raise TypeError(f"modules must hold module names (str), got {type(n).__name__}")
                if n not in table:
                    raise KeyError(f"no module named {n!r} in the model")
                m = table[n]
                if not supported(m):
                    raise TypeError(f"module {n!r}: {adapter_for(m)[1]}")
                out.append((n, m))
            return out
        raise TypeError("modules must be None, a regex (str or re.Pattern), a predicate or an "
                        f"iterable of module names; got {type(modules).__name__}")

    def _layer_dims(self, adapter: Adapter, module: nn.Module) -> Tuple[Dict[str, int], bool]:
        d_in, d_out = adapter.dims(module)
        bias_col = self.include_bias and isinstance(getattr(module, "bias", None), torch.Tensor)
        d_a = d_in + (1 if bias_col else 0)
        return {"h_a": d_a, "g_a": d_a, "h_b": d_out, "g_b": d_out}, bias_col

    def _build(self, model: nn.Module, modules) -> None:
        table = dict(model.named_modules())
        for name, n_heads in self.heads.items():
            if name not in table:
                raise KeyError(f"heads: no module named {name!r} in the model")
            if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
                raise ValueError(f"heads[{name!r}] must be a positive int, got {n_heads!r}")
        for name, module in self._select(model, modules):
            if isinstance(module, nn.MultiheadAttention):
                self._add_heads(name, module, int(module.num_heads), mha=True)
                continue
            adapter, _ = adapter_for(module)
            dims, bias_col = self._layer_dims(adapter, module)
            st = LayerStats(name, module, adapter.kind, adapter, self.streams, dims, bias_col)
            self._layers[name] = st
            self._linear[name] = st
        for name, n_heads in self.heads.items():
            module = table[name]
            if isinstance(module, nn.MultiheadAttention):
                if name not in self._groups:
                    self._add_heads(name, module, int(module.num_heads), mha=True)
                continue
            self._add_heads(name, module, n_heads, mha=False)

    def _add_heads(self, name: str, module: nn.Module, n_heads: int, mha: bool) -> None:
        grp = _HeadGroup(name, module, n_heads, mha)
        d = head_dim_of(module)
        if d is not None and d % n_heads:
            raise ValueError(f"heads: {name!r} has {d} output features, not divisible by "
                             f"{n_heads} heads")
        hd = None if d is None else d // n_heads
        streams = [s for s in self.streams if s in ("h_b", "g_b")]
        for i in range(n_heads):
            st = LayerStats(f"{name}.head{i}", module, "head", None, streams,
                            {} if hd is None else {"h_b": hd, "g_b": hd}, False,
                            parent=name, head=i)
            grp.layers.append(st)
            self._layers[st.name] = st
        self._groups[name] = grp

    # ---------------------------------------------------------------- memory
    def memory_plan(self, model: Optional[nn.Module] = None) -> List[Tuple[str, str, Optional[tuple], int]]:
        """``[(layer name, stream, state shape, bytes)]`` from module shapes alone (nothing needs
        to have run). Shared inputs are counted per layer (an upper bound); a heads split of a
        module whose width cannot be read from its attributes has shape None and 0 bytes."""
        if model is not None and model is not self.model:
            other = Collector(model, self._modules_arg, self.streams, self.normalize,
                              include_bias=self.include_bias, heads=self.heads,
                              state_dtype=self.state_dtype)
            return other.memory_plan()
        item = torch.empty((), dtype=self.state_dtype).element_size()
        plan = []
        for name, st in self._layers.items():
            for s in st.streams:
                d = st.dims.get(s)
                if d is None:
                    plan.append((name, s, None, 0))
                else:
                    plan.append((name, s, (d, d), item * (d + d * d)))
        return plan

    @classmethod
    def estimate_bytes(cls, model: nn.Module, modules=None, streams: Sequence[str] = STREAMS,
                       include_bias: bool = False, heads: Optional[Dict[str, int]] = None,
                       state_dtype: torch.dtype = torch.float32) -> int:
        """Total bytes of the Moments states a Collector with these arguments would hold."""
        col = cls(model, modules, streams, include_bias=include_bias, heads=heads,
                  state_dtype=state_dtype)
        return sum(b for *_, b in col.memory_plan())

    def nbytes(self) -> int:
        """Bytes held now by the Moments states (shared ones counted once)."""
        return sum(m.nbytes() for m in self._unique_moments())

    # ------------------------------------------------------------- life cycle
    def start(self) -> "Collector":
        """Register the hooks (idempotent). If the model holds an ``nn.MultiheadAttention``, the
        fused inference fast path of MHA / ``nn.TransformerEncoderLayer`` (which bypasses module
        hooks and ``out_proj``) is switched off until :meth:`stop`."""
        if self._running:
            return self
        if any(isinstance(m, nn.MultiheadAttention) for m in self.model.modules()):
            self._fastpath_prev = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        for st in self._linear.values():
            self._handles.append(st.module.register_forward_hook(self._make_forward_hook(st),
                                                                 with_kwargs=True))
        for grp in self._groups.values():
            if grp.mha:
                self._handles.append(grp.module.register_forward_pre_hook(
                    self._make_mha_pre_hook(grp), with_kwargs=True))
                self._handles.append(grp.module.register_forward_hook(
                    self._make_mha_post_hook(grp), always_call=True))
            else:
                self._handles.append(grp.module.register_forward_hook(self._make_heads_hook(grp)))
        self._running = True
        self._update_collecting()
        return self

    def stop(self) -> "Collector":
        """Remove every hook. Tensor hooks already attached to live tensors become inert."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for key in list(self._mha_state):
            LinearSpy.exit(self._mha_state.pop(key)[0])
        if self._fastpath_prev is not None:
            torch.backends.mha.set_fastpath_enabled(self._fastpath_prev)
            self._fastpath_prev = None
        self._running = False
        self._update_collecting()
        self._seen.clear()
        self._stager.flush()
        return self

    def __enter__(self) -> "Collector":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def step(self) -> int:
        """Advance the step counter that ``every`` uses; returns the new count."""
        self.steps += 1
        self._seen.clear()
        self._update_collecting()
        return self.steps

    @property
    def layers(self) -> Dict[str, LayerStats]:
        """name -> LayerStats, with every gathered row already in its state."""
        self._stager.flush()
        return self._layers

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
        leading dims, e.g. ``(B, T)``); ``None`` clears it. False rows count nowhere."""
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

    def _row_mask(self, lead: Tuple[int, ...], device: torch.device, st: Optional[LayerStats]):
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
        if self.max_rows is None or r <= self.max_rows:
            return None
        idx = torch.randperm(r, generator=self._gen)[: self.max_rows]
        return idx.to(device, non_blocking=True)

    def _grad_scale(self, terms):
        """Factor turning autograd's rows into per-sample gradients (None: leave them as they are).
        ``terms = (rows of the call, its full mask or None)`` gives the default N."""
        if self.normalize or self.loss_reduction == "sum":
            return None
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

    # ---------------------------------------------------------------- moments
    def _moments(self, st: LayerStats, stream: str, dim: int, device) -> Moments:
        attr = _ATTR[stream]
        m = getattr(st, attr)
        if m is None:
            m = Moments(dim, normalize=self.normalize, device=device, backend=self.backend,
                        dtype=self.state_dtype)
            setattr(st, attr, m)
        return m

    def _unique_moments(self, create: bool = False) -> List[Moments]:
        out, seen = [], set()
        for st in self._layers.values():
            for s in st.streams:
                m = getattr(st, _ATTR[s])
                if m is None and create and s in st.dims:
                    dev = _module_device(st.module) or torch.device("cpu")
                    m = self._moments(st, s, st.dims[s], dev)
                if m is not None and id(m) not in seen:
                    seen.add(id(m))
                    out.append(m)
        return out

    # ------------------------------------------------------------------ hooks
    def _make_forward_hook(self, st: LayerStats):
        def hook(module, args, kwargs, output):
            if not self._collecting:
                return None
            x = args[0] if args else _first_tensor(list(kwargs.values()))
            y = _first_tensor(output)
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
                self._on_layer(st, module, x, y)
            return None
        return hook

    def _on_layer(self, st: LayerStats, module, x: torch.Tensor, y: torch.Tensor,
                  rows_mask=None, lead_known: bool = False) -> None:
        """One call of a linear-like layer: x input, y output. ``rows_mask`` (already flattened)
        and ``lead_known`` are used by the MHA path, whose rows come pre-flattened."""
        ad = st.adapter
        st.forward_calls += 1
        yr, lead = ad.output_rows(module, y.detach())
        r = yr.shape[0]
        mask = rows_mask if lead_known else self._row_mask(lead, y.device, st)
        full_mask = mask
        idx = self._subsample(r, y.device)
        if idx is not None:
            yr = yr[idx]
            if mask is not None:
                mask = mask[idx]
        streams = st.streams
        want_grad = ("g_a" in streams or "g_b" in streams)
        grad_ok = want_grad and torch.is_grad_enabled() and y.requires_grad
        if want_grad and not grad_ok:
            st.forward_only_calls += 1
        use_input_hook = (grad_ok and "g_a" in streams and self.g_a_source == "auto"
                          and ad.input_grad_is_g_a() and not st.bias_col and x.requires_grad)

        # ---- h_a (with shared-input dedup) ---------------------------------
        owner = None
        if "h_a" in streams or use_input_hook:
            owner = self._shared_owner(st, x, alias_g_a=use_input_hook)
        if "h_a" in streams and not (owner is not None and st.H_a is owner.H_a):
            xr = ad.input_rows(module, x.detach())
            if idx is not None:
                xr = xr[idx]
            if st.bias_col:
                xr = torch.cat([xr, xr.new_ones(xr.shape[0], 1)], dim=1)
            self._stager.feed(self._moments(st, "h_a", st.dims["h_a"], x.device), xr, mask)
        if "h_b" in streams:
            self._stager.feed(self._moments(st, "h_b", st.dims["h_b"], y.device), yr, mask)
        if not grad_ok:
            return
        st.grad_calls += 1
        terms = (r, full_mask)

        # ---- g_a from the input's gradient ---------------------------------
        if use_input_hook and not (owner is not None and st.G_a is owner.G_a):
            ga_m = self._moments(st, "g_a", st.dims["g_a"], x.device)
            _hook_once(x, self._make_input_grad_hook(ga_m, ad, module, idx, mask, terms))

        # ---- g_b (and g_a = g_b @ W) from the output's gradient ------------
        gb_m = self._moments(st, "g_b", st.dims["g_b"], y.device) if "g_b" in streams else None
        ga_m = None
        if "g_a" in streams and not use_input_hook:
            ga_m = self._moments(st, "g_a", st.dims["g_a"], y.device)
        if gb_m is not None or ga_m is not None:
            _hook_once(y, self._make_output_grad_hook(st, module, gb_m, ga_m, idx, mask, terms))

    def _shared_owner(self, st: LayerStats, x: torch.Tensor, alias_g_a: bool) -> Optional[LayerStats]:
        """If another layer already took this very input tensor in this step, alias its H_a
        (and, when ``alias_g_a``, its input-hook G_a) where this layer has no rows of its own,
        and return that layer; else register ``st`` as the tensor's owner and return None.
        The caller skips exactly the streams that ended up shared (``st.X is owner.X``)."""
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x._version,
               st.kind, st.dims.get("h_a"), st.bias_col, st.adapter.geometry(st.module))
        entry = self._seen.get(key)
        if entry is not None:
            ref, owner = entry
            if ref() is not None and owner is not st:
                for s in ("h_a", "g_a") if alias_g_a else ("h_a",):
                    mine, theirs = getattr(st, _ATTR[s]), getattr(owner, _ATTR[s])
                    if s not in st.streams or theirs is None or mine is theirs:
                        continue
                    if mine is not None and mine.n > 0:
                        continue  # this layer already has rows of its own: keep it separate
                    setattr(st, _ATTR[s], theirs)
                    st.shared[s] = owner.shared.get(s, owner.name)
                return owner
        if len(self._seen) > 512:
            self._seen = {k: v for k, v in self._seen.items() if v[0]() is not None}
        self._seen[key] = (weakref.ref(x), st)
        return None

    def _make_input_grad_hook(self, m: Moments, ad: Adapter, module, idx, mask, terms):
        def hook(g):
            if not self._running:
                return None
            with torch.no_grad():
                self._input_grad(m, ad, module, g.detach(), idx, mask, terms)
            return None
        return hook

    def _input_grad(self, m, ad, module, g, idx, mask, terms):
        gr = ad.input_rows(module, g)
        if idx is not None:
            gr = gr[idx]
        scale = self._grad_scale(terms)
        if scale is not None:
            gr = gr * scale
        self._stager.feed(m, gr, mask)

    def _make_output_grad_hook(self, st: LayerStats, module, gb_m, ga_m, idx, mask, terms):
        ad = st.adapter

        def hook(g):
            if not self._running:
                return None
            with torch.no_grad():
                self._output_grad(st, ad, module, g.detach(), gb_m, ga_m, idx, mask, terms)
            return None
        return hook

    def _output_grad(self, st, ad, module, g, gb_m, ga_m, idx, mask, terms):
        gr, _ = ad.output_rows(module, g)
        if idx is not None:
            gr = gr[idx]
        scale = self._grad_scale(terms)
        if scale is not None:
            gr = gr * scale
        if gb_m is not None:
            self._stager.feed(gb_m, gr, mask)
        if ga_m is not None:
            self._stager.feed(ga_m, ad.g_a_from_g_b(module, gr, st.bias_col), mask)

    # ------------------------------------------------------------------ heads
    def _on_heads(self, grp: _HeadGroup, rows: torch.Tensor, mask, requires_grad: bool):
        """rows: (R, D) output rows of the module, split into ``grp.n_heads`` heads. Returns
        ``(Moments of g_b per head, idx, mask, terms)`` when gradients are to be hooked, else None."""
        layers = grp.layers
        h = grp.n_heads
        d_total = rows.shape[-1]
        if d_total % h:
            raise ValueError(f"heads: {grp.name!r} output has {d_total} features, not divisible by "
                             f"{h} heads")
        d = d_total // h
        for st in layers:
            st.forward_calls += 1
            if not st.dims:
                st.dims = {"h_b": d, "g_b": d}
        terms = (rows.shape[0], mask)
        idx = self._subsample(rows.shape[0], rows.device)
        if idx is not None:
            rows = rows[idx]
            if mask is not None:
                mask = mask[idx]
        streams = layers[0].streams
        if "h_b" in streams:
            per = rows.reshape(rows.shape[0], h, d).transpose(0, 1)
            for i, st in enumerate(layers):
                self._stager.feed(self._moments(st, "h_b", d, rows.device), per[i], mask)
        if "g_b" not in streams:
            return None
        if not (torch.is_grad_enabled() and requires_grad):
            for st in layers:
                st.forward_only_calls += 1
            return None
        ms = [self._moments(st, "g_b", d, rows.device) for st in layers]
        for st in layers:
            st.grad_calls += 1
        return ms, idx, mask, terms

    def _head_grad_hook(self, ms: List[Moments], n_heads: int, idx, mask, terms, reshape):
        def hook(g):
            if not self._running:
                return None
            with torch.no_grad():
                self._heads_grad(ms, n_heads, reshape(g.detach()), idx, mask, terms)
            return None
        return hook

    def _heads_grad(self, ms, n_heads, gr, idx, mask, terms):
        if idx is not None:
            gr = gr[idx]
        scale = self._grad_scale(terms)
        if scale is not None:
            gr = gr * scale
        d = gr.shape[-1] // n_heads
        per = gr.reshape(gr.shape[0], n_heads, d).transpose(0, 1)
        for i, m in enumerate(ms):
            self._stager.feed(m, per[i], mask)

    def _make_heads_hook(self, grp: _HeadGroup):
        def hook(module, args, output):
            if not self._collecting:
                return None
            y = _first_tensor(output)
            if y is None:
                return None
            rows = y.reshape(-1, y.shape[-1])
            mask = self._row_mask(tuple(y.shape[:-1]), y.device, grp.layers[0])
            if mask is None and self._mask is not None:
                for st in grp.layers[1:]:
                    st.unmasked_calls += 1
            res = self._on_heads(grp, rows.detach(), mask, rows.requires_grad)
            if res is not None:
                _hook_once(y, self._head_grad_hook(ms=res[0], n_heads=grp.n_heads, idx=res[1],
                                                     mask=res[2], terms=res[3],
                                                     reshape=lambda g: g.reshape(-1, g.shape[-1])))
            return None
        return hook

    # -------------------------------------------------- nn.MultiheadAttention
    def _make_mha_pre_hook(self, grp: _HeadGroup):
        mha = grp.module

        def pre_hook(module, args, kwargs):
            if not self._collecting:
                return None
            query = args[0] if args else kwargs.get("query")
            if not isinstance(query, torch.Tensor):
                return None
            # Internally rows are ordered (T, B): map the user's mask (on query's leading dims).
            lead = tuple(query.shape[:-1])
            batch_first = mha.batch_first and query.dim() == 3
            out_st = self._linear.get(grp.name + ".out_proj")
            if out_st is not None and out_st.module is not mha.out_proj:
                out_st = None
            state = {"lead": lead, "batch_first": batch_first, "out": out_st}

            def on_linear(inp, out):
                self._on_mha_out_proj(grp, state, inp, out)

            LinearSpy.enter(mha.out_proj.weight, on_linear)
            self._mha_state[id(mha)] = (mha.out_proj.weight, state)
            return None
        return pre_hook

    def _make_mha_post_hook(self, grp: _HeadGroup):
        mha = grp.module

        def post_hook(module, args, output):
            entry = self._mha_state.pop(id(mha), None)
            if entry is not None:
                LinearSpy.exit(entry[0])
            return None
        return post_hook

    def _on_mha_out_proj(self, grp: _HeadGroup, state: dict, inp: torch.Tensor,
                         out: torch.Tensor) -> None:
        """``inp``: (T·B, E) attention output before out_proj, rows in (T, B) order."""
        mask = None
        if self._mask is not None:
            lead = state["lead"]
            m = self._row_mask(lead, inp.device, None)
            if m is not None:
                m = m.reshape(lead)
                if state["batch_first"]:
                    m = m.transpose(0, 1)
                mask = m.reshape(-1)
            else:
                for st in grp.layers:
                    st.unmasked_calls += 1
        res = self._on_heads(grp, inp.detach(), mask, inp.requires_grad)
        if res is not None:
            _hook_once(inp, self._head_grad_hook(ms=res[0], n_heads=grp.n_heads, idx=res[1],
                                                   mask=res[2], terms=res[3], reshape=lambda g: g))
        out_st = state["out"]
        if out_st is not None:
            self._on_layer(out_st, out_st.module, inp, out, rows_mask=mask, lead_known=True)

    # ------------------------------------------------------------- reporting
    def report(self, *, floor: float = 1e-6, tol: float = 0.25, kind: str = "cov", **kwargs):
        """A :class:`crh_kernels.report.Report` of every layer (see there)."""
        from ..report import Report
        return Report.from_collector(self, floor=floor, tol=tol, kind=kind, **kwargs)

    def sync(self, group=None) -> None:
        """Exact all-reduce of every Moments (shared ones once) across ``group``'s ranks."""
        from ..distributed import all_reduce_moments
        self._stager.flush()
        all_reduce_moments(self._unique_moments(create=True), group=group)

    def reset(self) -> None:
        """Forget all rows (states, shared-input aliases, counters) but keep hooks and config."""
        self._stager.clear()
        for st in self._layers.values():
            st.H_a = st.H_b = st.G_a = st.G_b = None
            st.shared.clear()
            st.forward_calls = st.grad_calls = st.forward_only_calls = st.unmasked_calls = 0
        self._seen.clear()

    @property
    def meta(self) -> dict:
        """Configuration and what was (not) collected, for reports."""
        fwd = sum((st.H_a.n if st.H_a is not None else 0) + (st.H_b.n if st.H_b is not None else 0)
                  for st in self._layers.values())
        grad = sum((st.G_a.n if st.G_a is not None else 0) + (st.G_b.n if st.G_b is not None else 0)
                   for st in self._layers.values())
        wanted_grad = any(s in self.streams for s in ("g_a", "g_b"))
        notes = []
        forward_only = bool(fwd > 0 and grad == 0)
        if not wanted_grad:
            notes.append("forward streams only: gradient streams were not requested")
        elif forward_only:
            notes.append("forward streams only: every collected pass ran without gradients "
                         "(torch.no_grad / inference_mode, or nothing required grad); G_a, G_b "
                         "and every relation that needs them are missing")
        if any(st.kind == "head" for st in self._layers.values()):
            notes.append("per-head layers have only h_b and g_b: only the forward RGA applies")
        partial = [st.name for st in self._layers.values() if st.forward_only_calls and st.grad_calls]
        if partial:
            notes.append(f"{len(partial)} layer(s) also saw passes without gradients (their "
                         f"forward streams include rows that have no gradient rows)")
        unmasked = [st.name for st in self._layers.values() if st.unmasked_calls]
        if unmasked:
            notes.append("the mask did not match the activations of: " + ", ".join(unmasked[:8])
                         + (" ..." if len(unmasked) > 8 else "") + " (collected unmasked)")
        return {
            "steps": self.steps, "every": self.every, "streams": list(self.streams),
            "normalize": self.normalize, "max_rows": self.max_rows,
            "include_bias": self.include_bias, "loss_reduction": self.loss_reduction,
            "g_a_source": self.g_a_source, "forward_only": forward_only, "notes": notes,
        }

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to resume without loss: every Moments (shared ones once, others
        as aliases), the step count, the ``max_rows`` generator and the configuration."""
        self._stager.flush()
        layers = {}
        owner_of: Dict[int, Tuple[str, str]] = {}
        for name, st in self._layers.items():
            entry = {}
            for s in STREAMS:
                m = getattr(st, _ATTR[s])
                if m is None:
                    entry[s] = None
                elif id(m) in owner_of:
                    entry[s] = {"alias": list(owner_of[id(m)])}
                else:
                    owner_of[id(m)] = (name, s)
                    entry[s] = m.state_dict()
            entry["shared"] = dict(st.shared)
            entry["dims"] = dict(st.dims)
            entry["counters"] = [st.forward_calls, st.grad_calls, st.forward_only_calls,
                                 st.unmasked_calls]
            layers[name] = entry
        return {
            "format": _FORMAT, "steps": self.steps, "rng": self._gen.get_state(),
            "config": {"streams": list(self.streams), "normalize": self.normalize,
                       "every": self.every, "max_rows": self.max_rows,
                       "include_bias": self.include_bias, "loss_reduction": self.loss_reduction,
                       "g_a_source": self.g_a_source},
            "layers": layers,
        }

    def load_state_dict(self, sd: dict, strict: bool = True) -> None:
        """Restore :meth:`state_dict` output into this collector (same model structure)."""
        self._stager.clear()  # rows gathered before the restore belong to the replaced states
        if sd.get("format") != _FORMAT:
            raise ValueError(f"not a Collector state dict (format {sd.get('format')!r})")
        cfg = sd["config"]
        for k in ("normalize", "include_bias"):
            if cfg[k] != getattr(self, k):
                raise ValueError(f"state dict has {k}={cfg[k]}, this collector {getattr(self, k)}")
        names, mine = set(sd["layers"]), set(self._layers)
        if strict and names != mine:
            raise KeyError(f"layers differ: missing here {sorted(names - mine)[:5]}, missing in the "
                           f"state dict {sorted(mine - names)[:5]}")
        loaded: Dict[Tuple[str, str], Moments] = {}
        pending = []
        for name, entry in sd["layers"].items():
            st = self._layers.get(name)
            if st is None:
                continue
            dev = _module_device(st.module)
            for s in STREAMS:
                e = entry.get(s)
                if e is None:
                    setattr(st, _ATTR[s], None)
                elif "alias" in e:
                    pending.append((st, s, tuple(e["alias"])))
                else:
                    want = st.dims.get(s)
                    if want is not None and int(e["dim"]) != want:
                        raise ValueError(f"{name}.{s}: state dict dim {e['dim']}, layer has {want}")
                    m = Moments.from_state_dict(e, device=dev, backend=self.backend)
                    setattr(st, _ATTR[s], m)
                    loaded[(name, s)] = m
            st.shared = dict(entry.get("shared", {}))
            if not st.dims and entry.get("dims"):
                st.dims = dict(entry["dims"])
            c = entry.get("counters")
            if c:
                st.forward_calls, st.grad_calls, st.forward_only_calls, st.unmasked_calls = c
        for st, s, (oname, ostream) in pending:
            m = loaded.get((oname, ostream))
            if m is None:
                raise KeyError(f"{st.name}.{s} aliases {oname}.{ostream}, which the state dict lacks")
            setattr(st, _ATTR[s], m)
        self.steps = int(sd["steps"])
        self._gen.set_state(sd["rng"])
        self._seen.clear()
        self._update_collecting()

    def __repr__(self) -> str:
        kinds = {}
        for st in self._layers.values():
            kinds[st.kind] = kinds.get(st.kind, 0) + 1
        return (f"Collector({len(self._layers)} layers {kinds}, streams={self.streams}, "
                f"steps={self.steps}, every={self.every}, running={self._running})")
