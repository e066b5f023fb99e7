"""First-step calibration: find the modules whose codes bend the gradient, and widen them.

Most modules lose a few percent of their local gradient to 4-bit codes (a GELU about 3.5%),
and that is what S2A is built on. A few lose far more: a linear attention that divides by a
saved sum (EfficientViT's LiteMLA), an operand with one outlying column. No table of
operators can know them all, so calibration measures them on a real batch:

1. the loss is computed twice on the same batch, with the same random numbers and the same
   BatchNorm statistics: once with every saved tensor exact, once with the codes;
2. the exact run's gradient at each module's outputs is pushed back through that one module
   in both graphs (a local vector-Jacobian product to the module's inputs and parameters),
   so the comparison sees the module's own codes, not the error arriving from later layers;
3. modules whose local relative error exceeds ``tol`` keep what they save at
   :data:`WIDE_BITS` from then on. A module's local gradient also runs through its
   submodules, so the innermost modules above ``tol`` are widened first; a second
   measurement then widens whatever is still above ``tol`` (an outer module left out), and
   keeps exact the tensors of a widened module still above it whose error 8 bits did not cut
   :data:`UNHELPED`-fold (or that was not finite at 4 bits): no width helps there.

A module that works in place (``nn.SiLU(inplace=True)``, timm's ``BatchNormAct2d``) returns
its input, whose gradient then reads as its own: its error would be invisible. Such modules
are found in the first forward; the measurement then runs again with their inputs copied
first, so that their codes are measured like any other module's.

The random state, the buffers of the model (or of a wider ``scope``, such as the
LightningModule around it), ``.grad`` and the engine's statistics are as before the
calibration; only its widened modules change. The engine knows nothing of Lightning: the
callback calls this through :meth:`lightning_s2a.S2AHandle.calibrate` on the first training
batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .calibration_state import Watch, same_state

if TYPE_CHECKING:
    from .hooks import SavedTensorEngine

#: Code width of a module that calibration widens (the widest code; exact is the next step).
WIDE_BITS = 8
#: ``module_bits`` value for a module whose saved tensors are kept exact: its gradient was
#: not finite even at ``WIDE_BITS`` (a backward that compares saved values for equality), or
#: ``WIDE_BITS`` left it above its tolerance and did not help (see :data:`UNHELPED`).
EXACT_BITS = 32
#: A widened module whose error :data:`WIDE_BITS` did not cut by this factor, and still above
#: its tolerance, is kept exact: its error does not come from the codes' width.
UNHELPED = 4.0

_Call = tuple[str, list[torch.Tensor], list[torch.Tensor]]


def calibrate(
    engine: SavedTensorEngine,
    loss_fn: Callable[[], torch.Tensor],
    tol: float | None = None,
    scope: nn.Module | None = None,
    remeasure: bool = False,
    combine: Callable[[dict[str, float]], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Measure every module's local gradient error under its codes; widen those above ``tol``
    (None: the config's tolerance at the narrowest width each module's codes use).

    ``loss_fn`` runs the model's forward on one batch and returns a scalar loss (no
    backward). ``scope`` is the module whose buffers ``loss_fn`` may change (default: the
    model). ``remeasure`` always runs the second measurement, so that every process of a
    distributed run makes the same number of forwards. ``combine`` maps each measurement's
    errors to those decided on (a distributed run: the largest over its processes, each of
    which measured its own share of the batch). Returns the (combined) local relative error
    per module that saves tensors for backward; the modules above ``tol`` are in
    ``engine.module_bits`` afterwards.
    """
    if not engine.attached:
        raise RuntimeError("calibrate: the S2A engine is detached; call handle.start_engine().")
    cfg = engine.config
    if not cfg.compress:
        raise RuntimeError("calibrate: compress=False stores every tensor exact already.")
    if min(cfg.coded_widths()) >= WIDE_BITS:
        raise RuntimeError(
            f"calibrate: every code is {WIDE_BITS} bits already, and calibration widens to "
            f"{WIDE_BITS}; use fewer bits (e.g. bits=4) or leave calibration out."
        )
    if not torch.is_grad_enabled():
        raise RuntimeError("calibrate: needs autograd; call it outside torch.no_grad().")
    scope = engine.model if scope is None else scope
    before, unpacked = engine.module_bits, engine._unpacked
    engine.module_bits = {}  # measure the configured widths
    engine._measured_shapes = set()
    engine._measured_batch = engine._calibrating_batch = 0
    engine._kept_small = 0.0
    try:
        watch = Watch(engine, scope)
        errors, copied, widths = _measure(engine, loss_fn, watch, set())
        if combine is not None:
            errors = combine(errors)

        # Each module against the tolerance of its own width: an op_bits entry of 2 bits
        # measured against 4 bits' tolerance was widened to 8 (more bytes than 4 bits). A
        # module coded at WIDE_BITS already has nothing to widen (unless not finite).
        def widen(measured: dict[str, float]) -> set[str]:
            return {
                n
                for n, e in measured.items()
                if math.isinf(e)
                or (
                    e > (cfg.calibration_tol(widths.get(n)) if tol is None else tol)
                    and (widths.get(n) or cfg.bits) < WIDE_BITS
                )
            }

        above = widen(errors)
        # A module's local gradient runs through its submodules too: widen the innermost
        # modules above tol first, then whatever is still above it once they are wide.
        engine.module_bits = {n: WIDE_BITS for n in above if not _has_inside(n, above)}
        if remeasure or above:
            again, _, _ = _measure(engine, loss_fn, watch, copied)
            if combine is not None:
                again = combine(again)
            wide = set(engine.module_bits)
            engine.module_bits |= {n: WIDE_BITS for n in widen(again)}
            # Not finite at WIDE_BITS, or still above its tolerance there with its error not
            # cut even 4x (codes' error falls about 16x from 4 bits to 8: an error no width
            # bounds, such as min-max offsets off by more than the spread before their fix,
            # which read 217x off at 8 bits as at 4), or not finite at 4 bits: no code width
            # helps; its tensors are kept exact. One that 8 bits helped as codes should stays
            # at 8, above tolerance or not (efficientvit_b0's linear attention: 2.0 to 0.32;
            # exact, it cost 30% more bytes and no cosine).
            engine.module_bits |= {
                n: EXACT_BITS
                for n, e in again.items()
                if math.isinf(e)
                or (
                    n in wide
                    and e > (cfg.calibration_tol(widths.get(n)) if tol is None else tol)
                    and (e > errors[n] / UNHELPED or math.isinf(errors[n]))
                )
            }
    except BaseException:
        engine.module_bits = before
        raise
    finally:
        engine._unpacked = unpacked  # the measurement's backwards are no training backward
    engine.calibration = errors
    engine.calibrated = True
    engine.calibrated_for = engine.calibration_key(tol)
    engine.calibrated_shapes = tuple(sorted(engine._measured_shapes))
    engine.calibrated_batch = engine._measured_batch if engine._kept_small else 0
    engine.calibrated_small = engine._kept_small
    engine._warned_shape = engine._warned_batch = False
    return errors


def check_calibrated_shape(engine: SavedTensorEngine, shape: tuple | None) -> None:
    """Note the input shapes (each forward's first tensor, batch first) calibration's own
    forwards see; after it, say once that a forward's input is larger than every input of
    its rank calibration measured, batch aside: a tensor kept whole at the measured size
    (below ``min_numel``, a per-channel statistic where a stage is 1x1) is coded there,
    unmeasured (efficientnet_b0 calibrated at 32 px and trained at 64: eight squeeze-excite
    biases 9-14% off, none of their modules widened; 3% at most calibrated at 64). Or that
    its batch is larger than calibration's, and large enough that a tensor calibration kept
    whole for its size alone reaches ``min_numel`` (its largest size per batch item,
    ``calibrated_small``, times the batch): the same, one batch dimension over
    (efficientnet_b0 calibrated on one image, trained on 8: a squeeze-excite module measured
    0% off, its biases 8-10% off; said since 2026-12-07). Smaller inputs, and the shapes of
    every entry calibration ran (``forward_features``, then the head; two crops), are
    measured sizes or within them. The first dimension is taken for the batch."""
    if shape is None:
        return
    batch, shape = (shape[0], shape[1:]) if shape else (1, shape)
    if engine._saving is not None or engine._exact:  # calibration's own forwards
        engine._measured_shapes.add(shape)
        engine._measured_batch = max(engine._measured_batch, batch)
        engine._calibrating_batch = batch
        return
    measured = engine.calibrated_shapes
    if not measured:
        return
    if (
        not engine._warned_batch
        and 0 < engine.calibrated_batch < batch
        and engine.calibrated_small * batch >= engine.config.min_numel
    ):
        engine._warned_batch = True
        warnings.warn(
            f"S2A: this forward's batch is {batch}, larger than the {engine.calibrated_batch} "
            f"calibration measured the modules' codes on: tensors it kept whole for their "
            f"size alone (below min_numel={engine.config.min_numel} elements) are coded at "
            "this batch, unmeasured. Calibrate on a batch as large as the largest you train "
            "on (handle.calibrate(loss_fn) with such a batch, or S2ACallback's first batch "
            "at that size); said once.",
            stacklevel=4,
        )
        return
    if engine._warned_shape or shape in measured:
        return
    same_rank = [math.prod(m) for m in measured if len(m) == len(shape)]
    if same_rank and math.prod(shape) <= max(same_rank):
        return
    engine._warned_shape = True
    shown = ", ".join(str(list(m)) for m in measured)
    warnings.warn(
        f"S2A: this forward's input is {list(shape)} (batch aside), larger than calibration "
        f"measured the modules' codes on ({shown}): what is kept whole at the measured size "
        "and coded at this one (small tensors, per-channel statistics of a 1x1 stage) was not "
        "measured. Calibrate on the largest size you train at (handle.calibrate(loss_fn) "
        "with such a batch, or S2ACallback's first batch at that size); said once.",
        stacklevel=4,
    )


def warn_uncalibrated(engine: SavedTensorEngine) -> None:
    """A step check for ``S2AConfig(calibrate=True)``: say once that a training forward
    runs uncalibrated where nothing calibrates it (S2ACallback does, on the first training
    batch; a plain loop must call ``handle.calibrate``)."""
    if engine.calibrated or engine.calibrates_elsewhere or engine._saving is not None:
        return
    engine.calibrates_elsewhere = True  # said once
    warnings.warn(
        "S2AConfig(calibrate=True) is not carried out by itself: S2ACallback calibrates on "
        "the first training batch, and outside Lightning call "
        "handle.calibrate(lambda: loss_fn(model(x), y)) on one batch before training. Until "
        "then every module codes at the configured widths (said once).",
        stacklevel=4,
    )


def _has_inside(name: str, names: set[str]) -> bool:
    """True if one of ``names`` is a submodule of module ``name`` ("" is the model)."""
    prefix = f"{name}." if name else ""
    return any(n != name and n.startswith(prefix) for n in names)


def _measure(
    engine: SavedTensorEngine,
    loss_fn: Callable[[], torch.Tensor],
    watch: Watch,
    copied: set[str],
) -> tuple[dict[str, float], set[str], dict[str, int | None]]:
    """Local errors per module, the in-place modules whose inputs had to be copied, and the
    narrowest width each module's codes use."""
    in_place: set[str] = set()
    with same_state(engine, watch):
        exact_calls, exact_loss, _ = _record(engine, loss_fn, True, copied, in_place)
    _check_scalar(exact_loss)
    if in_place - copied:  # their gradients read as their inputs': measure again, copied
        copied = copied | in_place
        with same_state(engine, watch):
            exact_calls, exact_loss, _ = _record(engine, loss_fn, True, copied, set())
    with same_state(engine, watch):
        coded_calls, coded_loss, widths = _record(engine, loss_fn, False, copied, set())
    _check_same_loss(exact_loss, coded_loss)
    shape = [(n, len(i), len(o)) for n, i, o in exact_calls]
    if shape != [(n, len(i), len(o)) for n, i, o in coded_calls]:
        raise RuntimeError(
            "calibrate: the two forwards on the same batch called different modules; the "
            "model's control flow depends on something besides its input and random state."
        )
    params = {
        n: [p for p in m.parameters() if p.requires_grad] for n, m in engine.model.named_modules()
    }
    outputs = [t for _, _, outs in exact_calls for t in outs]
    grads = iter(torch.autograd.grad(exact_loss, outputs, retain_graph=True, allow_unused=True))
    errors: dict[str, float] = {}
    for (name, ins_e, outs_e), (_, ins_c, outs_c) in zip(exact_calls, coded_calls, strict=True):
        g = [next(grads) for _ in outs_e]
        kept = [i for i, gi in enumerate(g) if gi is not None]
        if not kept:
            continue  # nothing of this call reaches the loss
        g = [g[i] for i in kept]
        (in_e, par_e), (in_c, par_c) = (
            _vjp([outs[i] for i in kept], ins, params[name], g)
            for outs, ins in ((outs_e, ins_e), (outs_c, ins_c))
        )
        # The input's gradient and the module's trained parameters' gradient, each on its
        # own: joined, an exact path to the input (a residual's identity, x * gate's direct
        # term) swamped what the codes did to the parameters (a gated block's gate bias 8%
        # off where the joined error read 1.3%; EfficientNet-B0's squeeze-excite biases 12 to
        # 19% off, read under 1%). A parameter part whose exact gradient is rounding noise
        # (a conv bias an instance norm cancels) is measured with the input's, as before:
        # the codes' noise over no signal read 1e4 and widened every block. Noise is told by
        # both: next to nothing beside the input's gradient, and an error many times itself
        # (a real one, a squeeze-excite bias's 5-10%, can be as small beside the input's).
        if par_e.norm() < NEGLIGIBLE * in_e.norm() and _relative(par_c, par_e) > NOISE:
            in_e, in_c = torch.cat([in_e, par_e]), torch.cat([in_c, par_c])
            par_e = par_c = par_e[:0]
        for local_e, local_c in ((in_e, in_c), (par_e, par_c)):
            if local_e.norm() > 0:
                error = _relative(local_c, local_e)
                if not math.isfinite(error):  # codes that turn a finite gradient NaN: worst
                    error = math.inf
                errors[name] = max(errors.get(name, 0.0), error)
    return errors, copied, widths


#: A module's parameters' exact gradient below this share of its input's, and coded with a
#: relative error above ``NOISE``, is rounding noise: measured with the input's.
NEGLIGIBLE = 1e-3
NOISE = 10.0


def _relative(coded: torch.Tensor, exact: torch.Tensor) -> float:
    """``|coded - exact| / |exact|`` (infinite where ``exact`` is 0)."""
    scale = exact.norm().item()
    return (coded - exact).norm().item() / scale if scale > 0 else math.inf


def _vjp(
    outs: list[torch.Tensor],
    ins: list[torch.Tensor],
    params: list[torch.Tensor],
    g: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients ``g`` gives ``ins`` and ``params`` through ``outs``: each group as one
    flat float64 vector (empty where none reaches it)."""
    got = torch.autograd.grad(outs, ins + params, g, retain_graph=True, allow_unused=True)

    def flat(part: tuple) -> torch.Tensor:
        vectors = [v.detach().reshape(-1).double() for v in part if v is not None]
        return torch.cat(vectors) if vectors else torch.zeros(0, dtype=torch.float64)

    return flat(got[: len(ins)]), flat(got[len(ins) :])


def _check_scalar(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise TypeError(
            "calibrate: loss_fn must return the batch's scalar loss with a gradient, e.g. "
            f"lambda: F.cross_entropy(model(x), y); got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
            + "."
        )


def _tensors(value: Any) -> list[torch.Tensor]:
    """Tensors that carry a gradient anywhere in a module's arguments or output."""
    leaves, _ = tree_flatten(value)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]


def _record(
    engine: SavedTensorEngine,
    loss_fn: Callable[[], torch.Tensor],
    exact: bool,
    copied: set[str],
    in_place: set[str],
) -> tuple[list[_Call], torch.Tensor, dict[str, int | None]]:
    """Run ``loss_fn`` with every module call's gradient-carrying inputs and outputs noted,
    for the modules that save tensors themselves (the innermost module running at a save).
    Modules in ``copied`` work on copies of their inputs (their originals are noted, so the
    local gradient runs through the in-place op); modules found returning one of their inputs
    are added to ``in_place``."""
    calls: list[_Call] = []
    originals: dict[str, list[list[torch.Tensor]]] = {}
    handles = []
    for name, module in engine.model.named_modules():

        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any, name: str = name) -> None:
            stacked = originals.get(name)
            copied_ins = stacked.pop() if stacked else None
            if engine._saving is None or name not in engine._saving:
                return  # saves nothing itself: not measured
            outs = _tensors(out)
            if not outs:
                return
            ins = copied_ins if copied_ins is not None else _tensors(args) + _tensors(kwargs)
            if any(o is i for o in outs for i in ins):
                in_place.add(name)
            calls.append((name, ins, outs))

        def copy_inputs(mod: nn.Module, args: tuple, name: str = name) -> tuple:
            originals.setdefault(name, []).append(_tensors(args))
            return tuple(
                a.clone() if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args
            )

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
        if name in copied:
            handles.append(module.register_forward_pre_hook(copy_inputs))
    saving: dict[str, int | None] = {}
    engine._saving = saving
    engine._exact = exact
    try:
        loss = loss_fn()
    finally:
        engine._exact, engine._saving = False, None
        for h in handles:
            h.remove()
    return calls, loss, saving


def _check_same_loss(exact: torch.Tensor, coded: torch.Tensor) -> None:
    """The codes change no forward value: two losses that differ mean that something besides
    the batch changed between the two forwards, and the errors measured compare two
    different computations. Said (a step may keep state of its own: a counter, a queue)."""
    a, b = float(exact.detach()), float(coded.detach())
    if not (a == b or abs(a - b) <= 1e-4 * max(abs(a), abs(b), 1e-3)):
        warnings.warn(
            f"calibrate: the exact and the coded forward of the same batch gave the losses "
            f"{a!r} and {b!r}: something besides the batch changed between them (random "
            "numbers calibration does not replay: it replays torch's, Python's and NumPy's "
            "global generators and torch.Generator attributes of the modules; or state the "
            "step keeps: a counter, a schedule, a queue), so the errors it measured compare "
            "two different computations and the modules it widened may not be the ones that "
            "need it. Draw such numbers outside the loss function, or seed them inside it.",
            stacklevel=4,
        )
