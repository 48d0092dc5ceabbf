"""Low-VRAM inference: keep what fits on the compute device, stream the rest from CPU block by block.

    >>> from acestep_train.inference.offload import OffloadManager
    >>> bundle = load_model("turbo", device="cpu")                      # weights live on the storage device
    >>> with OffloadManager(bundle, "cuda", vram_limit_gb=3.0) as mgr:  # hooks on; anchors moved to cuda
    ...     result = Sampler(bundle, tiled_decode=True)(requests)
    >>> mgr.report()["peak_resident_bytes"]

How it works (after DiffSynth's ``vram_limit`` with weights as the budget):

* **Components** (the phases of a generation): ``text_encoder`` (Qwen3), ``condition_encoder`` (``model.encoder``,
  ``tokenizer``, ``detokenizer``), ``dit`` (``model.decoder``) and ``vae``. Only one is *active*; switching to
  another evicts everything the previous one kept on the device (DiffSynth's ``load_models_to_device``). A switch
  happens automatically when a component's module runs or one of its entry methods is called (``encode_captions``,
  ``encode_conditions``, ``cross_kv``, ``vae.decode`` ...), or explicitly with :meth:`OffloadManager.phase`. A plain
  method call is seen by no module hook, so the entry methods are wrapped while attached (an instance attribute
  shadows the method; detach removes it): the wrapper switches the phase and holds the component's pins.
* **Blocks** (the streaming unit): every element of an ``nn.ModuleList`` (DiT layers, encoder-stack layers, Qwen3
  layers, VAE encoder/decoder blocks) is one block holding all its parameters and buffers; any other module with
  parameters of its own (embeddings, projections, norms, the DiT's ``scale_shift_table``) is a block of those.
  A forward pre-hook moves a block's tensors to the compute device just before its forward and a post-hook moves
  them back after it, unless the block was kept *resident*: on first use, in execution order, a block stays on the
  device while ``anchors + resident + block + reserve <= limit`` (DiffSynth's "preparing" state), where
  ``reserve`` is the most a component ever needs in flight at once (its pinned modules plus the largest chain of
  nested blocks). So the bytes on the device never exceed the limit, and the early layers stay while the later
  ones stream. Modules inside a block also get hooks, so a method that reaches into a layer without calling the
  layer's forward (``cross_kv`` -> ``layer.cross_attn.project_kv``) still finds its weights.
* **Anchors** stay on the compute device for the whole attachment: tiny tensors that the sampler reads directly or
  uses to find "the model's device" (``next(model.parameters())``, ``null_condition_emb``, the first VAE
  parameter, the FSQ quantiser, which ``indices_to_quantized`` uses outside any forward).
* **Pins**: modules that must be on the device for the whole of an entry call because code reads their device
  before any forward runs (``TextEncoder._tokenize`` reads ``embed_tokens.weight.device``).

The limit covers parameters and buffers (what ``resident_bytes`` counts); activations (attention, VAE tiles) come
on top of it: ``bench/bench_low_vram.py`` measures the real peak on a GPU. With ``compute == storage`` (no GPU)
nothing moves but the accounting runs the same; ``force_copy=True`` then makes every "move" a real copy so that
the mechanism itself can be tested on a CPU. Weights and the module structure must not change while attached: fuse,
load or remove adapters before attaching. Unfused LoRA adapters (:func:`~acestep_train.lora.load_adapters`) are PEFT
layers whose ``lora_A`` / ``lora_B`` weights are parameters of the layer that holds them, so they are streamed with
that layer's block like any other parameter (changing a strength while attached is fine: it is no tensor).
Legacy weight-norm convolutions (the VAE) recompute ``weight`` from ``weight_g``/``weight_v`` in a pre-hook and
keep it as a plain attribute; the manager replaces it with a meta placeholder after each forward so it does not
hold device memory, and recomputes it on detach.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from acestep_train.inference.offload_plan import (COMPONENTS, Block, BlockPlan, ComponentSpec, Managed, OffloadError,
                                                  bundle_components, drop_weight_norm, weight_norms)

log = logging.getLogger(__name__)

GB = 1024**3
ANCHORS = "anchors"

def _fmt(nbytes: float) -> str:
    return f"{nbytes / GB:.3f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1024**2:.1f} MB"


def _norm_device(device: str | torch.device) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        if not torch.cuda.is_available():
            raise OffloadError("compute device 'cuda' requested but CUDA is not available")
        d = torch.device("cuda", torch.cuda.current_device())
    return d


class OffloadManager:
    """Stream a :class:`~acestep_train.checkpoints.loading.ModelBundle` through a limited compute device (see the
    module docstring).

    ``vram_limit_gb`` / ``limit_bytes``: the budget for parameters and buffers on the compute device (None: no
    limit, everything an active component touches stays until the next phase: the official ``offload_to_cpu``).
    ``storage_device``: where the weights live (they must be there when attaching). ``pin_memory`` (default: when
    computing on CUDA) page-locks the storage copies so host-to-device copies are asynchronous. ``force_copy``:
    copy tensors "to" the compute device even when it is the storage device (tests the mechanism on a CPU).
    """

    def __init__(self, bundle, compute_device: str | torch.device = "cuda", *, vram_limit_gb: float | None = None,
                 limit_bytes: int | None = None, storage_device: str | torch.device = "cpu",
                 pin_memory: bool | None = None, force_copy: bool = False, empty_cache: bool = True):
        if vram_limit_gb is not None and limit_bytes is not None:
            raise OffloadError("give vram_limit_gb or limit_bytes, not both")
        if vram_limit_gb is not None:
            if isinstance(vram_limit_gb, bool) or not isinstance(vram_limit_gb, (int, float)) or not vram_limit_gb > 0:
                raise OffloadError(f"vram_limit must be a number of GB > 0, got {vram_limit_gb!r}")
            limit_bytes = int(vram_limit_gb * GB)
        self.bundle = bundle
        self.compute = _norm_device(compute_device)
        self.storage = _norm_device(storage_device)
        self.limit = limit_bytes
        self.force_copy = force_copy
        self.moves = force_copy or self.compute != self.storage  # do tensors really change place?
        self.pin = (self.compute.type == "cuda") if pin_memory is None else bool(pin_memory)
        self.pin = self.pin and self.storage.type == "cpu" and torch.cuda.is_available()
        self.empty_cache = empty_cache
        self.active: str | None = None
        self.history: list[str] = []  # components in the order they became active
        self.resident_bytes = 0  # managed tensors on the compute device now
        self.kept_bytes = 0  # the part of it that stays after release (anchors, resident blocks)
        self.peak_bytes = 0
        self.moved_bytes = 0  # storage -> compute traffic since attach
        self.overflows = 0
        self.listeners: list[Callable[[str, str, int], None]] = []  # fn(event, block or phase, resident_bytes)
        self.attached = False
        self._reset()

    def _reset(self) -> None:
        self._tensors: dict[Any, Managed] = {}
        self._blocks: list[Block] = []
        self._specs: dict[str, ComponentSpec] = {}
        self._pin_blocks: dict[str, list[Block]] = {}
        self._reserve: dict[str, int] = {}
        self._handles: list[Any] = []
        self._wrapped: list[tuple[Any, str]] = []
        self._weight_norm_modules: list[nn.Module] = []

    # ---- public ------------------------------------------------------------------------------------------------

    def __enter__(self) -> "OffloadManager":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def anchor_bytes(self) -> int:
        return sum(t.nbytes for t in self._tensors.values() if t.anchor)

    @property
    def min_limit_bytes(self) -> int:
        """The smallest limit this bundle runs under: anchors plus the largest in-flight set of one component."""
        return self.anchor_bytes + max(self._reserve.values(), default=0)

    def component_bytes(self, component: str) -> int:
        """Bytes of a component's tensors on the compute device now (``"anchors"``: the anchors)."""
        if component == ANCHORS:
            return self.anchor_bytes
        return sum(t.nbytes for t in self._tensors.values()
                   if t.on_compute and not t.anchor and t.component == component)

    def component_sizes(self) -> dict[str, int]:
        """Bytes of every component's managed tensors (wherever they are), anchors excluded."""
        sizes = {c: 0 for c in COMPONENTS}
        for t in self._tensors.values():
            if not t.anchor:
                sizes[t.component] += t.nbytes
        return sizes

    def is_on_compute(self, tensor: torch.Tensor) -> bool:
        """Whether a parameter is (accounted) on the compute device now."""
        t = self._tensors.get(id(tensor))
        if t is None:
            raise KeyError("not a parameter managed by this OffloadManager")
        return t.on_compute

    def attach(self) -> "OffloadManager":
        """Install the hooks and entry wrappers, move the anchors. Weights must be on the storage device."""
        if self.attached:
            raise OffloadError("this OffloadManager is already attached")
        self._reset()
        self._check_storage()
        try:
            plan = BlockPlan(self.bundle)
            self._tensors, self._blocks, self._specs = plan.tensors, plan.blocks, plan.specs
            self._pin_blocks, self._reserve = plan.pin_blocks, plan.reserve
            self._weight_norm_modules = plan.weight_norm_modules
            if self.limit is not None and self.min_limit_bytes > self.limit:
                raise OffloadError(self._too_small())
            for block in self._blocks:
                self._hook(block.module, block)
            for comp, spec in self._specs.items():
                for obj, method in spec.entries:
                    self._wrap(comp, obj, method)
            for t in self._tensors.values():
                if self.pin and not t.storage.is_pinned():
                    t.storage = t.storage.pin_memory()
                    t.set(t.storage)
                if t.anchor:
                    self._move_in(t)
        except BaseException:
            self.detach()
            raise
        self.attached = True
        self._update_peak("attach", ANCHORS)
        log.info("offload: compute %s, storage %s, limit %s (smallest working set %s), anchors %s, components %s",
                 self.compute, self.storage, "none" if self.limit is None else _fmt(self.limit),
                 _fmt(self.min_limit_bytes), _fmt(self.anchor_bytes),
                 {c: _fmt(b) for c, b in self.component_sizes().items()})
        return self

    def detach(self) -> None:
        """Everything back on the storage device; hooks and wrappers removed."""
        for h in self._handles:
            h.remove()
        for obj, name in self._wrapped:
            obj.__dict__.pop(name, None)
        for t in self._tensors.values():
            if t.on_compute and self.moves:
                t.set(t.storage)
        if self.moves:
            with torch.no_grad():
                for m in self._weight_norm_modules:
                    for wn in weight_norms(m):
                        setattr(m, wn.name, wn.compute_weight(m))
        self._reset()
        self.resident_bytes = self.kept_bytes = 0
        self.active = None
        self.attached = False
        self._empty_cache()

    def activate(self, component: str) -> None:
        """Make ``component`` the active phase: what another component kept on the device leaves it."""
        if component not in COMPONENTS:
            raise OffloadError(f"unknown component {component!r}; choose one of {COMPONENTS}")
        if component == self.active:
            return
        self._evict(lambda t: t.component != component)
        self.active = component
        self.history.append(component)
        self._notify("phase", component)

    @contextlib.contextmanager
    def phase(self, component: str) -> Iterator["OffloadManager"]:
        """``with mgr.phase("text_encoder"): ...``: activate a component; on exit all of it leaves the device."""
        self.activate(component)
        try:
            yield self
        finally:
            self._evict(lambda t: t.component == component)
            self.active = None

    def offload_all(self) -> None:
        """Everything but the anchors back to the storage device."""
        self._evict(lambda t: True)
        self.active = None

    def report(self) -> dict[str, Any]:
        used = [b for b in self._blocks if b.uses]
        return {
            "compute_device": str(self.compute), "storage_device": str(self.storage), "limit_bytes": self.limit,
            "min_limit_bytes": self.min_limit_bytes, "anchor_bytes": self.anchor_bytes,
            "peak_resident_bytes": self.peak_bytes, "resident_bytes": self.resident_bytes,
            "moved_bytes": self.moved_bytes, "overflows": self.overflows, "component_bytes": self.component_sizes(),
            "phases": list(self.history), "blocks": len(self._blocks), "blocks_used": len(used),
            "blocks_streamed": sum(1 for b in used if b.streamed > 1),
        }

    # ---- building ----------------------------------------------------------------------------------------------

    def _check_storage(self) -> None:
        mods = [self.bundle.model, self.bundle.vae, self.bundle.text_encoder]
        wrong = sorted({str(t.device) for m in mods for t in (*m.parameters(), *m.buffers())
                        if t.device != self.storage})
        if wrong:
            raise OffloadError(f"the bundle's weights must be on the storage device {self.storage} before attaching "
                               f"(found {wrong}); load it with device='{self.storage}'")

    def _too_small(self) -> str:
        worst = max(self._reserve, key=self._reserve.get)
        return (f"vram_limit {_fmt(self.limit)} is below the smallest working set {_fmt(self.min_limit_bytes)} "
                f"(always-resident anchors {_fmt(self.anchor_bytes)} + the {worst} phase's largest set of layers in "
                f"flight {_fmt(self._reserve[worst])}); raise vram_limit")

    # ---- hooks -------------------------------------------------------------------------------------------------

    def _hook(self, module: nn.Module, block: Block) -> None:
        weight_norm = bool(weight_norms(module))
        move_inputs = self.compute != self.storage

        def pre(mod, args, kwargs):
            self._acquire(block)
            if move_inputs:
                return self._to_compute(args), self._to_compute(kwargs)
            return None

        def post(mod, args, output):
            if weight_norm and self.moves:
                drop_weight_norm(mod)
            self._release(block)

        # prepend: before weight norm's own pre-hook, which computes ``weight`` from weight_g / weight_v.
        self._handles.append(module.register_forward_pre_hook(pre, prepend=True, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post, always_call=True))

    def _wrap(self, comp: str, obj: Any, method: str) -> None:
        original = getattr(obj, method)

        @functools.wraps(original)
        def entry(*args, **kwargs):
            self.activate(comp)
            pins = self._pin_blocks.get(comp, [])
            for b in pins:
                self._acquire(b)
            try:
                return original(*args, **kwargs)
            finally:
                for b in reversed(pins):
                    self._release(b)

        obj.__dict__[method] = entry  # an instance attribute shadows the method; detach pops it
        self._wrapped.append((obj, method))

    def _to_compute(self, obj):
        if isinstance(obj, torch.Tensor):
            return obj if obj.device == self.compute else obj.to(self.compute, non_blocking=True)
        if type(obj) in (tuple, list):
            return type(obj)(self._to_compute(o) for o in obj)
        if type(obj) is dict:
            return {k: self._to_compute(v) for k, v in obj.items()}
        return obj

    # ---- moving ------------------------------------------------------------------------------------------------

    def _move_in(self, t: Managed) -> None:
        if t.on_compute:
            return
        if self.moves:
            with torch.inference_mode(False), torch.no_grad():
                if t.storage.device == self.compute:
                    data = t.storage.clone()
                else:
                    data = t.storage.to(self.compute, non_blocking=self.pin)
            t.set(data)
            self.moved_bytes += t.nbytes
        t.on_compute = True
        self.resident_bytes += t.nbytes
        if t.anchor or t.resident:
            self.kept_bytes += t.nbytes

    def _move_out(self, t: Managed) -> None:
        if not t.on_compute:
            return
        if t.anchor or t.resident:
            self.kept_bytes -= t.nbytes
        t.resident = False
        if self.moves:
            t.set(t.storage)
        t.on_compute = False
        self.resident_bytes -= t.nbytes

    def _mark_kept(self, t: Managed, keep: bool) -> None:
        """Keep a tensor on the device after release, or not (``kept_bytes`` counts anchors + kept tensors)."""
        if t.anchor or t.resident == keep:
            return
        t.resident = keep
        if t.on_compute:
            self.kept_bytes += t.nbytes if keep else -t.nbytes

    def _acquire(self, block: Block) -> None:
        if self.active != block.component:
            self.activate(block.component)
        block.uses += 1
        need = [t for t in block.tensors if not t.on_compute]
        if need:
            block.streamed += 1
            new = sum(t.nbytes for t in need)
            keep = self.limit is None or self.kept_bytes + new + self._reserve[block.component] <= self.limit
            for t in need:
                self._move_in(t)
                self._mark_kept(t, keep)
            self._update_peak("acquire", block.name)
        for t in block.tensors:
            t.refs += 1

    def _release(self, block: Block) -> None:
        moved = False
        for t in block.tensors:
            t.refs -= 1
            if t.refs <= 0:
                t.refs = 0
                if not t.resident and not t.anchor and t.on_compute:
                    self._move_out(t)
                    moved = True
        if moved:
            self._notify("release", block.name)

    def _evict(self, which: Callable[[Managed], bool]) -> None:
        moved = False
        for t in self._tensors.values():
            if t.anchor or not t.on_compute or not which(t):
                continue
            self._mark_kept(t, False)
            if t.refs == 0:  # a block still in use leaves when it is released
                self._move_out(t)
                moved = True
        if moved:
            self._empty_cache()
            self._notify("evict", self.active or "")

    def _empty_cache(self) -> None:
        if self.empty_cache and self.compute.type == "cuda":
            torch.cuda.empty_cache()

    def _update_peak(self, event: str, name: str) -> None:
        now = self.resident_bytes
        self.peak_bytes = max(self.peak_bytes, now)
        if self.limit is not None and now > self.limit:
            self.overflows += 1
            if self.overflows == 1:
                warnings.warn(f"offload: {_fmt(now)} of weights on {self.compute}, over the {_fmt(self.limit)} limit "
                              f"(at {name}); was a component called inside another one's forward?", stacklevel=3)
        self._notify(event, name)

    def _notify(self, event: str, name: str) -> None:
        for fn in self.listeners:
            fn(event, name, self.resident_bytes)


def iter_blocks(mgr: OffloadManager) -> Iterable[tuple[str, str, int, bool]]:
    """``(block, component, bytes, unit)`` of an attached manager, in build order (for tests and reports)."""
    for b in mgr._blocks:
        yield b.name, b.component, b.nbytes, b.unit


__all__ = ["OffloadManager", "OffloadError", "bundle_components", "iter_blocks", "COMPONENTS", "GB"]
