"""OffloadedAdamW: AdamW whose fp32 state lives in a TieredStore (NVMe), with a RAM tier.

    opt = OffloadedAdamW(model.parameters(), "/nvme/opt", lr=1e-4, pinned_bytes="64GiB")
    loss.backward(); opt.step(); opt.zero_grad()

Call order of one ``step()``:
1. ``max_grad_norm``: ``torch.nn.utils.clip_grad_norm_`` over the parameters (the grads are
   scaled in place, exactly as if the caller had clipped). Under ``GradScaler.step(opt)``: a
   step with an inf/nan gradient is skipped; otherwise the loss scale (and the clip
   coefficient, from the unscaled norm) multiply the fp32 copies of the grads.
2. First step only (no ``load_state_dict`` before it): each tile's initial state is written to
   the store (master = the parameter in fp32, exp_avg = exp_avg_sq = 0).
3. For each tile ``i`` in order: ``executor.acquire(i, write=True)`` (the plan's reads of the
   next tiles run meanwhile), torch's own AdamW (``torch.optim.adamw.adamw``, the same kernels
   and arguments as ``torch.optim.AdamW``) on the tile's views, a parameter with a master
   copy then takes the new master's values (``param.copy_(master)``), and
   ``executor.release(i, dirty=True)``: the plan copies the tile back and writes it in place,
   unless it keeps the tile in pinned memory, where it stays dirty until the next flush.
4. ``executor.finish()``: the last tile's write-back starts.

``state_dict()`` flushes (every dirty tile reaches NVMe, the store commits) and returns a
small dict: the step counts, the param groups, the tile layout, and for each tile the slot its
states were committed in, with each state key's version and checksum; the fp32 states are
never copied into it.

Two slots (``resumable=True``, the default): each state key has two places in the store, the
key and ``key@1``. After a ``state_dict()`` the steps write the other slot of each tile, so the
states that state_dict committed are never overwritten before the next ``state_dict()``
commits: a process killed at any moment (mid-step, mid-flush, while the caller was still
saving the newer state_dict) resumes from the last state_dict it saved, bit for bit. That
costs twice the states' size on disk, not more I/O. ``resumable=False``: one slot, rewritten
in place; a kill after a state_dict, once a step has run, leaves states that fail loudly
(IntegrityError or StaleStateError), never silently wrong.
"""

from __future__ import annotations

import logging
import os
from collections import deque

import torch
from torch.optim.adamw import adamw

from infinity.config import format_size, parse_size
from infinity.errors import CapacityError, ConfigError, InfinityError, IntegrityError
from infinity.io import PinnedPool, bounce_bytes
from infinity.io.pinned import pinnable_bytes
from infinity.runtime import Executor
from infinity.schedule import plan
from infinity.store import StoreConfig, TieredStore, UnknownKeyError
from infinity.training.tiles import Tile, build_tiles, layout_of

log = logging.getLogger(__name__)

FORMAT = 1  # of the "infinity" entry of a state_dict
MIN_PINNED_TILES = 3  # two stream buffers of the largest tile and a write reserve
PLAN_REPEATS = 3  # passes the planner simulates (the order repeats every step)
INIT_WINDOW = 2  # tiles written at once when the states are created
DEFAULT_PINNED_SHARE = 4  # pinned_bytes=None: all the states, up to 1/4 of pinnable memory


class StaleStateError(InfinityError):
    """A state_dict whose states in the store were rewritten by later steps."""


class OffloadedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as ``torch.optim.AdamW``) with its fp32 state in ``store``:
    a directory, a list of directories (striped), or an open TieredStore (the caller's; it is
    flushed, never closed, here). ``pinned_bytes``: RAM for the tiles the plan keeps resident
    plus the stream buffers (default: all the states, up to a quarter of the pinnable memory;
    0: the buffers only, three tiles; less than that but not 0: ConfigError).
    ``max_grad_norm``: clip by global norm before each step, as
    ``torch.nn.utils.clip_grad_norm_``. ``tile_bytes``: the unit of I/O and update.
    ``foreach``/``fused``: as torch's AdamW; by default torch's fused CPU kernel (bitwise
    ``torch.optim.AdamW(fused=True)``; ``fused=False`` for its single-tensor kernels).
    ``store_config``: the StoreConfig of a store opened here. ``resumable``: two slots per
    state on disk, so that a kill at any moment resumes from the last state_dict (False: half
    the disk, one slot rewritten in place; see the module docstring)."""

    def __init__(
        self,
        params,
        store,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        max_grad_norm: float | None = None,
        pinned_bytes: int | str | None = None,
        tile_bytes: int | str = "64MiB",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        store_config: StoreConfig | None = None,
        key_prefix: str = "adamw/",
        resumable: bool = True,
        device="cpu",
    ):
        _check_hyper(lr, betas, eps, weight_decay)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        if torch.device(device).type != "cpu":
            raise ConfigError(f"device {device!r}: OffloadedAdamW updates on the CPU for now")
        if fused is None and not foreach:
            fused = True  # torch's fused CPU AdamW: 1.26 ns/param against 5.97 unfused (2 cores)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False,
            maximize=maximize, foreach=foreach, fused=fused, capturable=False,
            differentiable=False,
        )  # fmt: skip
        self._tiles: list[Tile] | None = None
        self._closed, self._initialized = True, False
        self._broken: BaseException | None = None
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: torch.Tensor | None = None
        self._params = [p for g in self.param_groups for p in g["params"]]
        _check_devices(self._params)
        self.resumable = bool(resumable)
        groups = [g["params"] for g in self.param_groups]
        self._tiles = build_tiles(groups, parse_size(tile_bytes), key_prefix)
        if not self._tiles:
            raise ConfigError("OffloadedAdamW: no parameter requires grad")
        self._steps = {s.key: torch.tensor(0.0) for t in self._tiles for s in t.slices}
        self._open(store, store_config, pinned_bytes)
        self._closed = False

    def _open(self, store, store_config, pinned_bytes) -> None:
        sizes = [t.unit.nbytes for t in self._tiles]
        largest, total = max(sizes), sum(sizes)
        budget = _pinned_budget(pinned_bytes, total, largest)
        self._own_store = not isinstance(store, TieredStore)
        config = store_config or StoreConfig(pinned_bytes=0)  # the executor owns the buffers
        # + the plan's device tier (on the CPU a tile being updated is its pinned buffer) and
        # one tile of slack: tiles of unequal sizes fragment the pool (seen: 116 MiB free in
        # pieces, no 64 MiB block, a tile staged in pageable memory)
        pool_bytes = budget + 3 * largest
        pool_bytes += (bounce_bytes(config.aio) + config.pinned_bytes) * self._own_store
        self._pool = PinnedPool(pool_bytes)
        opened = None
        try:
            if self._own_store:
                store = opened = TieredStore.open(store, config, pool=self._pool)
            if store.readonly:
                raise ConfigError(f"store {store.paths[0]} is read-only")
            order = list(range(len(sizes)))
            p = plan(sizes, order, gpu_bytes=2 * largest, pinned_bytes=budget,
                     writes=[True] * len(order), repeats=PLAN_REPEATS)  # fmt: skip
            self._plan = p
            _check_disk(store, self._slot_keys(), [t.unit for t in self._tiles])
            self._executor = self._new_executor(store)
        except BaseException:
            if opened is not None:
                opened.close()
            self._pool.close()
            raise
        self._store = store
        log.info(
            "OffloadedAdamW: %d tiles, %s of state in %s, %s pinned; %s",
            len(sizes), format_size(total), self._store.paths[0], format_size(budget), p,
        )  # fmt: skip

    def _new_executor(self, store) -> Executor:
        return Executor(store, [t.unit for t in self._tiles], self._plan, "cpu", self._pool)

    def _slot_keys(self) -> list[tuple[list[str], list[str]]]:
        """Per tile: its store keys in slot 0 and in slot 1 (one slot: the same keys)."""
        out = []
        for t in self._tiles:
            keys = t.unit.keys
            out.append((keys, [f"{k}@1" for k in keys] if self.resumable else keys))
        return out

    def add_param_group(self, param_group: dict) -> None:
        if self._tiles is not None:
            raise ConfigError(
                "OffloadedAdamW.add_param_group after construction: the state tiles are laid "
                "out when the optimizer is built; pass every group to the constructor"
            )
        for flag in ("amsgrad", "capturable", "differentiable"):
            if param_group.get(flag):
                raise ConfigError(f"OffloadedAdamW does not support {flag}=True")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])

    # -- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_usable()
        with_grad = self._check_grads()
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler.step, see below
        if not with_grad or (found_inf is not None and bool(found_inf)):
            return loss  # an overflow: nothing changes, the scaler lowers its scale
        factor = self._grad_factor(with_grad, getattr(self, "grad_scale", None))
        if not self._initialized:
            self._init_states()
        ex = self._executor
        try:
            for i, tile in enumerate(self._tiles):
                views = ex.acquire(i, write=True)
                try:
                    self._update(tile, views, factor)
                finally:
                    ex.release(i, dirty=True)
            ex.finish()
        except IntegrityError as exc:
            self._broken = exc
            if self.resumable:
                raise
            raise IntegrityError(
                f"{exc}. If a run was killed during a step after its last state_dict(), that "
                "step's in-place writes overwrote the checkpointed states (resumable=False): "
                "they cannot be resumed"
            ) from exc
        except BaseException as exc:
            self._broken = exc
            raise
        return loss

    def _check_grads(self) -> list[torch.Tensor]:
        """The parameters with a gradient; a wrong gradient fails here, before any tile moves."""
        tracked = {s.param for t in self._tiles for s in t.slices}
        out = []
        for i, p in enumerate(self._params):
            g = p.grad
            if g is None:
                continue
            if i not in tracked and p.numel():
                raise ConfigError(
                    f"parameter {i} {tuple(p.shape)} has a gradient but had requires_grad=False "
                    "when the optimizer was built (it has no state); build it after unfreezing"
                )
            if g.is_sparse or g.shape != p.shape:
                raise ConfigError(
                    f"parameter {i} {tuple(p.shape)}: its gradient is "
                    f"{'sparse' if g.is_sparse else tuple(g.shape)}; AdamW needs a dense one "
                    "of the parameter's shape"
                )
            out.append(p)
        return out

    # torch.amp.GradScaler.step(opt) hands a scaled step to the optimizer (``grad_scale``, the
    # scale still in the grads, None once ``scaler.unscale_(opt)`` ran; ``found_inf``) instead
    # of unscaling the grads itself, which it refuses to do for fp16 grads: fp16 models work.
    _step_supports_amp_scaling = True

    def _grad_factor(self, with_grad, scale) -> torch.Tensor | None:
        """What multiplies the fp32 grads: the inverse loss scale and the clip coefficient, or
        None. Without a scale the clip is ``clip_grad_norm_`` itself (grads scaled in place);
        with one, the same formula on the unscaled norm, applied to the fp32 copies."""
        if scale is None:
            if self.max_grad_norm is not None:
                self.last_grad_norm = torch.nn.utils.clip_grad_norm_(
                    with_grad, self.max_grad_norm, foreach=self.defaults["foreach"]
                )
            return None
        factor = scale.double().reciprocal().float().cpu()  # as GradScaler.unscale_
        if self.max_grad_norm is None:
            return factor
        norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32).cpu() for p in with_grad]
        total = torch.linalg.vector_norm(torch.stack(norms)) * factor
        self.last_grad_norm = total
        return factor * torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)

    def _update(self, tile: Tile, views: dict[str, torch.Tensor], factor=None) -> None:
        group = self.param_groups[tile.group]
        weights, grads, avgs, avg_sqs, steps, publish = [], [], [], [], [], []
        for s in tile.slices:
            p = self._params[s.param]
            if p.grad is None:
                continue
            keys, end = s.keys, s.start + s.numel
            grad = p.grad.reshape(-1)[s.start : end].to(device="cpu", dtype=torch.float32)
            if factor is not None:
                grad = grad * factor  # a new tensor: p.grad stays as the caller left it
            if s.master:
                weight = views[keys["master"]]
                publish.append((p.detach().view(-1)[s.start : end], weight))
            else:
                weight = p.detach().view(-1)[s.start : end]
            weights.append(weight)
            grads.append(grad)
            avgs.append(views[keys["exp_avg"]])
            avg_sqs.append(views[keys["exp_avg_sq"]])
            steps.append(self._steps[s.key])
        if not weights:
            return
        beta1, beta2 = group["betas"]
        adamw(
            weights, grads, avgs, avg_sqs, [], steps,
            foreach=group["foreach"], fused=group["fused"], capturable=False,
            differentiable=False, grad_scale=None, found_inf=None, has_complex=False,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
        )  # fmt: skip
        for param, master in publish:
            param.copy_(master)

    def _init_states(self) -> None:
        """Each tile's first state, written to the store: the fp32 master, zeroed moments."""
        if any(key in self._store for both in self._slot_keys() for key in both[0]):
            log.warning(
                "OffloadedAdamW: overwriting the optimizer states of an earlier run in %s "
                "(call load_state_dict() before the first step to resume them)",
                self._store.paths[0],
            )
        running: deque = deque()
        for i, tile in enumerate(self._tiles):
            keys, tensors = self._executor.stored_keys(i), []
            for s in tile.slices:
                p = self._params[s.param]
                for name in s.keys:
                    if name == "master":
                        flat = p.detach().reshape(-1)[s.start : s.start + s.numel]
                        value = flat.to(device="cpu", dtype=torch.float32, copy=True)
                    else:
                        value = torch.zeros(s.numel, dtype=torch.float32)
                    tensors.append(value)
            running.append(self._store.pwrite(keys, tensors))
            if len(running) >= INIT_WINDOW:
                running.popleft().result()
        for future in running:
            future.result()
        for t in self._tiles:
            for s in t.slices:
                self._steps[s.key].zero_()
        self._share_steps()
        self._initialized = True

    def _share_steps(self) -> None:
        """``state[p]["step"]``: the step count of the parameter's first slice."""
        for t in self._tiles:
            for s in t.slices:
                if s.start == 0:
                    self.state[self._params[s.param]] = {"step": self._steps[s.key]}

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Flush (the store commits every state), then the small dict described above."""
        self._check_usable()
        if self._initialized:
            self._executor.flush()
        sd = super().state_dict()
        sd["state"] = {i: {k: v.clone() for k, v in st.items()} for i, st in sd["state"].items()}
        versions, slots = {}, []
        if self._initialized:
            for i, (zero, _) in enumerate(self._slot_keys()):
                stored = self._executor.stored_keys(i)
                slots.append(0 if stored == zero else 1)
                for key in stored:
                    info = self._store.entry(key)
                    versions[key] = [info.version, info.checksum]
            self._executor.redirect([pair[1 - slot] for pair, slot in
                                     zip(self._slot_keys(), slots, strict=True)])  # fmt: skip
        sd["infinity"] = {
            "format": FORMAT,
            "paths": list(self._store.paths),
            "initialized": self._initialized,
            "layout": layout_of(self._tiles),
            "resumable": self.resumable,
            "slots": slots,
            "versions": versions,
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from a ``state_dict()`` of an optimizer over the same store and model. The
        store must still hold the states that state_dict committed: StaleStateError if later
        steps rewrote them (keep only the newest state_dict of a store)."""
        self._check_usable()
        info = state_dict.get("infinity") if isinstance(state_dict, dict) else None
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise ConfigError(
                "not a state_dict of OffloadedAdamW (no 'infinity' entry of format "
                f"{FORMAT}); a torch.optim.AdamW state_dict cannot be loaded into it"
            )
        if info["layout"] != layout_of(self._tiles):
            raise ConfigError(
                "this state_dict was saved for other parameters (its tile layout differs: "
                "another model, other param groups, tile_bytes or key_prefix)"
            )
        if bool(info.get("resumable")) != self.resumable:
            raise ConfigError(
                f"this state_dict was saved with resumable={bool(info.get('resumable'))}; build "
                f"the optimizer with the same (it is resumable={self.resumable})"
            )
        if self._initialized:
            self._executor.flush()  # our newest states are the store's: compare those
        if info["initialized"]:
            self._check_versions(info)
        self._executor.close()  # what it keeps resident may be newer than the state_dict
        self._executor = self._new_executor(self._store)
        if info["initialized"]:
            pairs = self._slot_keys()
            slots = info["slots"]
            self._executor.redirect(
                [pair[1 - slot] for pair, slot in zip(pairs, slots, strict=True)],
                stored=[pair[slot] for pair, slot in zip(pairs, slots, strict=True)],
            )
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "infinity"})
        for t in self._tiles:
            for s in t.slices:
                saved = self.state.get(self._params[s.param], {}).get("step")
                self._steps[s.key].fill_(float(saved) if saved is not None else 0.0)
        self._share_steps()
        self._initialized = bool(info["initialized"])

    def _check_versions(self, info: dict) -> None:
        stale = []
        for key, (version, checksum) in info["versions"].items():
            try:
                entry = self._store.entry(key)
            except UnknownKeyError:
                stale.append(f"{key} missing")
                continue
            if (entry.version, entry.checksum) != (version, checksum):
                stale.append(f"{key} at version {entry.version}, saved at {version}")
        if stale:
            raise StaleStateError(
                f"the optimizer states in {self._store.paths[0]} have changed since this "
                f"state_dict was saved ({len(stale)} of {len(info['versions'])} keys: "
                f"{', '.join(stale[:3])}): later steps rewrote them in place, so only the "
                "newest state_dict of this store can be resumed; load that one"
                + (
                    ""
                    if self.resumable
                    else " (or train with resumable=True: two slots keep the last one intact)"
                )
            )

    # -- the rest ------------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._closed:
            raise InfinityError("this OffloadedAdamW was closed")
        if self._broken is not None:
            raise InfinityError(
                f"a step of this OffloadedAdamW failed midway ({self._broken!r}): its states "
                "are partly updated; build a new one and load the last state_dict"
            )

    def stats(self) -> dict:
        """The executor's: steps, bytes read and written, time waited, the plan."""
        return self._executor.stats()

    @property
    def store(self) -> TieredStore:
        return self._store

    def flush(self) -> None:
        """Every state on NVMe, committed."""
        self._check_usable()
        if self._initialized:
            self._executor.flush()

    def close(self) -> None:
        """Flush, then release the executor, the store (if opened here) and the pinned pool."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._initialized and self._broken is None:
                self._executor.flush()
        finally:
            self._executor.close()
            if self._own_store:
                self._store.close()
            self._pool.close()

    def __enter__(self) -> OffloadedAdamW:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_hyper(lr, betas, eps, weight_decay) -> None:
    lr_value = float(lr) if isinstance(lr, torch.Tensor) else lr
    if not 0.0 <= lr_value:
        raise ConfigError(f"invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ConfigError(f"invalid epsilon value: {eps}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"invalid betas {betas}: two values in [0, 1)")
    if not 0.0 <= weight_decay:
        raise ConfigError(f"invalid weight_decay value: {weight_decay}")


def _check_devices(params: list[torch.Tensor]) -> None:
    devices: dict[str, int] = {}
    for p in params:
        devices[str(p.device)] = devices.get(str(p.device), 0) + 1
    if len(devices) > 1:
        spread = ", ".join(f"{n} on {d}" for d, n in devices.items())
        raise ConfigError(
            f"the parameters are on {len(devices)} devices ({spread}): OffloadedAdamW updates "
            "one model on one device; move the model (model.to(device)) before building it"
        )


def _check_disk(store: TieredStore, slots, units) -> None:
    """Before the first step: room for every state key the store does not hold yet."""
    need = 0
    for (zero, one), unit in zip(slots, units, strict=True):
        for keys in {tuple(zero), tuple(one)}:
            for key, piece in zip(keys, unit.pieces, strict=True):
                if key not in store:
                    need += piece.nbytes
    if not need:
        return
    free, seen = 0, set()
    for path in store.paths:
        st = os.statvfs(path)
        if st.f_fsid not in seen:
            seen.add(st.f_fsid)
            free += st.f_bavail * st.f_frsize
    if need > free:
        total = sum(u.nbytes for u in units)
        copies = 1 if slots[0][0] == slots[0][1] else 2
        raise CapacityError(
            f"OffloadedAdamW needs {format_size(need)} more disk for its optimizer states "
            f"({format_size(total)} of fp32 state x {copies} slot(s)) and "
            f"{', '.join(store.paths)} has {format_size(free)} free: free space, "
            "add a path (a list of directories stripes the states), or pass resumable=False "
            "(one slot: half the disk, but a kill after a state_dict cannot be resumed)"
        )


def _pinned_budget(pinned_bytes, total: int, largest: int) -> int:
    """The pinned bytes for the stream buffers and resident tiles: at least three of the
    largest tile (two stream buffers and a write reserve); 0 asks for just that."""
    floor = MIN_PINNED_TILES * largest
    if pinned_bytes is None:
        cap = pinnable_bytes()[0] // DEFAULT_PINNED_SHARE
        return max(floor, min(total + floor, cap))
    budget = parse_size(pinned_bytes)
    if 0 < budget < floor:
        raise ConfigError(
            f"pinned_bytes={format_size(budget)} cannot hold the pipeline's buffers: it needs "
            f"{format_size(floor)}, three of the largest tile ({format_size(largest)}: two "
            "being read or updated, one being written). Give at least that, pinned_bytes=0 "
            "for exactly that, or a smaller tile_bytes"
        )
    return max(budget, floor)
