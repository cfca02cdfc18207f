"""``convert(model)``: swap, in place, every module fusekit can compute for its fusekit counterpart.

Families, converted in this order (a family's modules are recognized by structure: attribute
names, parameter shapes and, for attention, class names; never by import path):

- ``inverted_residual``: torchvision / timm inverted-residual blocks (``fuse_inverted_residuals``);
- ``inception_dwconv``: InceptionNeXt token mixers (``dwconv_hw``/``dwconv_w``/``dwconv_h``/``split_indexes``);
- ``neighborhood_attention``: NATTEN's NeighborhoodAttention1D/2D/3D modules, 0.17 and >= 0.20 APIs;
- ``gqa_attention``: grouped-query attention with the forward of ``fusekit.models.gqa.GroupedQueryAttention``;
- ``depthwise``: the remaining depthwise nn.Conv2d / nn.Conv1d.

Replacements reuse the very same parameters, buffers and submodules, so the state dict (keys,
order, values) does not change and checkpoints load both ways. A module of a family that cannot be
expressed exactly (hooks, parametrized weights, overridden forward, unknown attributes or
arguments, attention whose forward cannot be known from its structure...) is left unchanged and
listed in the report with the reason. fusekit's own modules are skipped, and not looked into.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, NamedTuple

import torch.nn as nn
from torch.nn.utils import parametrize

from ..ops.na import resolve_conf
from .depthwise import (_FUSEKIT_CLASS_FOR, DepthwiseConv1d, DepthwiseConv2d, InceptionDWConv2d, _check_backend,
                        _check_min_kernel_size, _conversion_problem, _has_hooks)
from .inverted_residual import MODES, _FusedBlock, _fused_spec, _Unsupported, fuse_inverted_residuals
from .mqa import MultiQueryAttention
from .na import (NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D,
                 _NeighborhoodAttention)

__all__ = ["FAMILIES", "ConversionReport", "FamilyCount", "convert"]

FAMILIES = ("inverted_residual", "inception_dwconv", "neighborhood_attention", "gqa_attention", "depthwise")

# modules computed by fusekit: skipped, and their submodules too (their forward reads the weights directly)
_FUSEKIT_MODULES = (DepthwiseConv1d, DepthwiseConv2d, InceptionDWConv2d, _FusedBlock, _NeighborhoodAttention,
                    MultiQueryAttention)


class FamilyCount(NamedTuple):
    replaced: int
    left: int


@dataclass
class ConversionReport:
    """What ``convert`` did. ``replaced``: (name, old class, new class, family) per module name;
    ``left``: (name, class, family, reason) for modules of a family that were left unchanged.
    A module reachable under several names is listed under each; the model itself is named ""."""

    replaced: list[tuple[str, str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, FamilyCount]:
        """Per family (all of FAMILIES, in order): how many module names were replaced and left."""
        return {family: FamilyCount(sum(r[3] == family for r in self.replaced), sum(r[2] == family for r in self.left))
                for family in FAMILIES}

    def __str__(self) -> str:
        rows = [("module", "family", "change")]
        rows += [(name or "<model>", family, f"{old} -> {new}") for name, old, new, family in self.replaced]
        rows += [(name or "<model>", family, f"{cls} left: {reason}") for name, cls, family, reason in self.left]
        widths = [max(len(row[i]) for row in rows) for i in range(2)]
        lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]
        lines.insert(1, "-" * min(100, max(len(line) for line in lines)))
        totals = ", ".join(f"{family} {c.replaced} replaced / {c.left} left" for family, c in self.counts().items()
                           if c.replaced or c.left)
        lines.append(f"total: {totals or 'nothing to convert'}")
        return "\n".join(lines)


# A classifier says what to do with one module for its family: None (not of the family), a str
# (of the family, left unchanged for that reason) or a function building the replacement.
_Classifier = Callable[[nn.Module], "str | Callable[[], nn.Module] | None"]


def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """named_modules(remove_duplicate=False), without descending into fusekit's modules."""
    yield prefix, module
    if isinstance(module, _FUSEKIT_MODULES):
        return
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, f"{prefix}.{name}" if prefix else name)


def _module_problem(module: nn.Module) -> str | None:
    """Reasons shared by every family for leaving a module as it is."""
    if _has_hooks(module):
        return "it has hooks (the replacement would not run them)"
    if parametrize.is_parametrized(module):
        return "it has parametrizations (its parameters are computed on the fly)"
    return None


def _base_named(module: nn.Module, names: Iterable[str]) -> type | None:
    """The first class of ``module``'s MRO whose name is one of ``names``."""
    names = set(names)
    return next((cls for cls in type(module).__mro__ if cls.__name__ in names), None)


def _forward_arguments(module: nn.Module) -> list[str]:
    """The names of the arguments ``module``'s forward takes after self (``*args``/``**kwargs`` spelled so)."""
    stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [stars.get(p.kind, "") + name
            for name, p in list(inspect.signature(type(module).forward).parameters.items())[1:]]


def _forward_problem(module: nn.Module, base: type, max_arguments: int) -> str | None:
    """Whether ``module``'s forward is ``base``'s and takes at most ``max_arguments`` plain arguments
    (those of the fusekit module: x for neighborhood attention, x and cache for GQA)."""
    if type(module).forward is not base.forward:
        return f"{type(module).__name__} overrides the forward of {base.__name__}; its semantics are unknown"
    arguments = _forward_arguments(module)
    extra = [a for i, a in enumerate(arguments) if i >= max_arguments or a.startswith("*")]
    if extra:
        return (f"its forward takes {', '.join(extra)} (e.g. extra key/value tokens or masks), which the fusekit "
                f"module does not accept")
    return None


def _unknown_state(module: nn.Module, children: set[str], parameters: set[str], attributes: set[str]) -> str | None:
    extra_children = sorted(set(module._modules) - children)
    extra_tensors = sorted((set(module._parameters) - parameters) | set(module._buffers))
    extra_attributes = sorted(name for name in vars(module)
                              if not name.startswith("_") and name != "training" and name not in attributes)
    for what, names in (("submodules", extra_children), ("parameters or buffers", extra_tensors),
                        ("attributes", extra_attributes)):
        if names:
            return f"unknown {what} {names}; the fusekit module would ignore them"
    return None


def _adopt(new: nn.Module, module: nn.Module, defaults: dict[str, nn.Module]) -> nn.Module:
    """Give ``new`` the submodules of ``module`` in their order (state_dict key order), then ``defaults``
    for those it lacks, and its training flag (children keep their own)."""
    for name, child in module._modules.items():
        new.add_module(name, child)
    for name, child in defaults.items():
        if name not in new._modules:
            new.add_module(name, child)
    new.training = module.training
    return new


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------
# inception_dwconv
# ----------------------------------------------------------------------------------------------

_INCEPTION_PARTS = ("dwconv_hw", "dwconv_w", "dwconv_h")


def _classify_inception(backend):
    def classify(module: nn.Module):
        if not all(hasattr(module, a) for a in _INCEPTION_PARTS + ("split_indexes",)):
            return None
        problem = _module_problem(module) or _unknown_state(module, set(_INCEPTION_PARTS), set(), {"split_indexes"})
        if problem:
            return problem
        hooked = [name for name in _INCEPTION_PARTS if _has_hooks(getattr(module, name))]
        if hooked:  # the fused op reads the conv weights and never calls the convs
            return f"{', '.join(hooked)} {'has' if len(hooked) == 1 else 'have'} hooks (the fused op would skip them)"
        base = _base_named(module, ["InceptionDWConv2d"])
        if base is not None and base is not type(module) and type(module).forward is not base.forward:
            return f"{type(module).__name__} overrides the forward of {base.__name__}; its semantics are unknown"
        try:
            new = InceptionDWConv2d.from_module(module, backend=backend)  # validates the convs, shares them
        except (TypeError, ValueError) as error:
            return str(error)
        return lambda: new
    return classify


# ----------------------------------------------------------------------------------------------
# neighborhood_attention
# ----------------------------------------------------------------------------------------------

_NA_CLASSES = {"NeighborhoodAttention1D": NeighborhoodAttention1D, "NeighborhoodAttention2D": NeighborhoodAttention2D,
               "NeighborhoodAttention3D": NeighborhoodAttention3D}
# NATTEN 0.17 (dim, rpb, attn_drop) and >= 0.20 (embed_dim, stride, na_dim) module attributes
_NA_ATTRIBUTES = {"dim", "embed_dim", "na_dim", "num_heads", "head_dim", "scale", "kernel_size", "stride", "dilation",
                  "is_causal", "attn_drop_rate", "expected_input_tensor_rank"}


def _dropout_rate(module: nn.Module | None, what: str) -> float:
    if module is None or isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return float(module.p)
    raise _Unsupported(f"{what} is {type(module).__name__}, not nn.Dropout or nn.Identity")


def _na_replacement(module: nn.Module, rank: int, backend) -> Callable[[], nn.Module]:
    """The replacement builder, or _Unsupported naming why the module cannot be expressed."""
    qkv, proj = module._modules.get("qkv"), module._modules.get("proj")
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
        raise _Unsupported("qkv and proj must be nn.Linear")
    channels = qkv.in_features
    heads = getattr(module, "num_heads", None)
    if not _integer(heads) or heads < 1 or channels % heads:
        raise _Unsupported(f"num_heads {heads!r} must be a positive int dividing the {channels} channels")
    if qkv.out_features != 3 * channels or proj.in_features != channels or proj.out_features != channels:
        raise _Unsupported(f"needs qkv Linear({channels}, {3 * channels}) and proj Linear({channels}, {channels}), "
                           f"got qkv -> {qkv.out_features}, proj {proj.in_features} -> {proj.out_features}")
    head_dim = channels // heads
    for name, expected in (("dim", channels), ("embed_dim", channels), ("head_dim", head_dim), ("na_dim", rank),
                           ("expected_input_tensor_rank", rank + 2)):
        if name in vars(module) and getattr(module, name) != expected:
            raise _Unsupported(f"{name} = {getattr(module, name)!r} does not match the module's shapes ({expected})")
    scale = getattr(module, "scale", head_dim ** -0.5)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise _Unsupported(f"scale must be a Python number, got {type(scale).__name__}")
    try:
        conf = resolve_conf(rank, (1 << 30,) * rank, module.kernel_size, getattr(module, "stride", 1),
                            getattr(module, "dilation", 1), getattr(module, "is_causal", False))
    except (AttributeError, TypeError, ValueError) as error:
        raise _Unsupported(f"kernel_size/stride/dilation/is_causal: {error}") from None
    rpb = module._parameters.get("rpb")  # a buffer or plain attribute of that name is unknown state
    if rpb is not None:
        shape = (heads,) + tuple(2 * k - 1 for k in conf.kernel_size)
        if tuple(rpb.shape) != shape:
            raise _Unsupported(f"rpb has shape {tuple(rpb.shape)}, expected {shape}")
        if any(conf.is_causal):
            raise _Unsupported("a relative positional bias with causal masking is undefined")
    attn_rate = _dropout_rate(module._modules.get("attn_drop"), "attn_drop")
    _dropout_rate(module._modules.get("proj_drop"), "proj_drop")
    cls = _NA_CLASSES[f"NeighborhoodAttention{rank}D"]

    def build() -> nn.Module:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.embed_dim = new.dim = channels
        new.num_heads, new.head_dim, new.scale = heads, head_dim, float(scale)
        new.kernel_size, new.stride, new.dilation, new.is_causal = \
            conf.kernel_size, conf.stride, conf.dilation, conf.is_causal
        new.backend = backend
        new.register_parameter("rpb", rpb)
        new.attn_drop_rate = attn_rate
        return _adopt(new, module, {"attn_drop": nn.Dropout(0.0), "proj_drop": nn.Dropout(0.0)})
    return build


def _classify_na(backend) -> _Classifier:
    def classify(module: nn.Module):
        base = _base_named(module, _NA_CLASSES)
        if base is None:
            return None
        rank = int(base.__name__[-2])
        try:
            problem = (_module_problem(module) or _forward_problem(module, base, 1)
                       or _unknown_state(module, {"qkv", "attn_drop", "proj", "proj_drop"}, {"rpb"}, _NA_ATTRIBUTES))
            if problem:
                return problem
            return _na_replacement(module, rank, backend)
        except _Unsupported as why:
            return str(why)
    return classify


# ----------------------------------------------------------------------------------------------
# gqa_attention
# ----------------------------------------------------------------------------------------------

_GQA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_GQA_ATTRIBUTES = {"embed_dim", "num_heads", "num_kv_heads", "num_key_value_heads", "head_dim", "causal", "window",
                   "scale"}


def _gqa_replacement(module: nn.Module, backend) -> Callable[[], nn.Module]:
    q, k, v, o = (module._modules[name] for name in _GQA_PROJECTIONS)
    if not all(isinstance(p, nn.Linear) for p in (q, k, v, o)):
        raise _Unsupported("q_proj, k_proj, v_proj and o_proj must be nn.Linear")
    heads = getattr(module, "num_heads", None)
    kv_heads = getattr(module, "num_kv_heads", getattr(module, "num_key_value_heads", None))
    head_dim, embed_dim = getattr(module, "head_dim", None), getattr(module, "embed_dim", q.in_features)
    if not all(_integer(n) and n >= 1 for n in (heads, kv_heads, head_dim)) or heads % kv_heads:
        raise _Unsupported(f"needs positive ints num_heads ({heads!r}) multiple of num_kv_heads ({kv_heads!r}) "
                           f"and head_dim ({head_dim!r})")
    if "num_kv_heads" in vars(module) and "num_key_value_heads" in vars(module) and \
            module.num_kv_heads != module.num_key_value_heads:
        raise _Unsupported("num_kv_heads and num_key_value_heads disagree")
    shapes = {"q_proj": (embed_dim, heads * head_dim), "k_proj": (embed_dim, kv_heads * head_dim),
              "v_proj": (embed_dim, kv_heads * head_dim), "o_proj": (heads * head_dim, embed_dim)}
    for name, (fan_in, fan_out) in shapes.items():
        p = module._modules[name]
        if (p.in_features, p.out_features) != (fan_in, fan_out):
            raise _Unsupported(f"{name} is Linear({p.in_features}, {p.out_features}), expected "
                               f"Linear({fan_in}, {fan_out}) for {heads} heads, {kv_heads} K/V heads of {head_dim}")
    causal, window = getattr(module, "causal", True), getattr(module, "window", None)
    scale = getattr(module, "scale", None)
    if not isinstance(causal, bool):
        raise _Unsupported(f"causal must be a bool, got {causal!r}")
    if window is not None and not (isinstance(window, (tuple, list)) and len(window) == 2
                                   and all(w is None or (_integer(w) and w >= 0) for w in window)):
        raise _Unsupported(f"window must be None or (left, right) of ints >= 0 or None, got {window!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise _Unsupported(f"scale must be None or a Python number, got {type(scale).__name__}")

    def build() -> nn.Module:
        new = MultiQueryAttention.__new__(MultiQueryAttention)
        nn.Module.__init__(new)
        new.embed_dim, new.num_heads, new.num_kv_heads, new.head_dim = embed_dim, heads, kv_heads, head_dim
        new.causal, new.window, new.scale, new.backend = causal, window, scale, backend
        return _adopt(new, module, {})
    return build


def _classify_gqa(backend) -> _Classifier:
    def classify(module: nn.Module):
        if not all(isinstance(module._modules.get(name), nn.Module) for name in _GQA_PROJECTIONS):
            return None
        base = _base_named(module, ["GroupedQueryAttention"])
        if base is None:
            return (f"{type(module).__name__} has q/k/v/o projections, but its forward "
                    f"({', '.join(_forward_arguments(module))}) cannot be "
                    f"known from its structure (rotary embeddings, attention masks...); only GroupedQueryAttention "
                    f"modules (forward(x, cache=None)) are converted")
        try:
            problem = (_module_problem(module) or _forward_problem(module, base, 2)
                       or _unknown_state(module, set(_GQA_PROJECTIONS), set(), _GQA_ATTRIBUTES))
            if problem:
                return problem
            return _gqa_replacement(module, backend)
        except _Unsupported as why:
            return str(why)
    return classify


# ----------------------------------------------------------------------------------------------
# depthwise
# ----------------------------------------------------------------------------------------------

def _classify_depthwise(backend, min_kernel_size: int) -> _Classifier:
    def classify(module: nn.Module):
        # depthwise-like: one group per input channel (channel multipliers included; 1-channel dense convs not)
        if not isinstance(module, (nn.Conv2d, nn.Conv1d)) or module.groups != module.in_channels or \
                (module.groups == 1 and module.out_channels != 1):
            return None
        problem = _conversion_problem(module, min_kernel_size)
        if problem:
            return problem
        return lambda: _FUSEKIT_CLASS_FOR[type(module)].from_conv(module, backend=backend)
    return classify


# ----------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------

def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)


def _convert_family(model: nn.Module, family: str, classify: _Classifier, report: ConversionReport) -> None:
    replacement: dict[int, nn.Module] = {}
    for name, module in list(_walk(model)):
        if isinstance(module, _FUSEKIT_MODULES):
            continue
        new = replacement.get(id(module))
        if new is None:
            verdict = classify(module)
            if verdict is None:
                continue
            if isinstance(verdict, str):
                report.left.append((name, type(module).__name__, family, verdict))
                continue
            new = replacement[id(module)] = verdict()
        _set_module(model, name, new)
        report.replaced.append((name, type(module).__name__, type(new).__name__, family))


def _convert_inverted_residuals(model: nn.Module, mode: str, backend, report: ConversionReport) -> None:
    before = {name: type(module).__name__ for name, module in model.named_modules(remove_duplicate=False)}
    saved = {attr: vars(model)[attr] for attr in ("fusekit_fused", "fusekit_skipped") if attr in vars(model)}
    root = fuse_inverted_residuals(model, mode=mode, backend=backend)
    assert root is model, "the model itself is checked before conversion"
    fused, skipped = model.fusekit_fused, model.fusekit_skipped
    for attr in ("fusekit_fused", "fusekit_skipped"):  # the report says it; keep the model's attributes as they were
        if attr in saved:
            setattr(model, attr, saved[attr])
        else:
            delattr(model, attr)
    for name in fused:
        report.replaced.append((name, before[name], type(model.get_submodule(name)).__name__, "inverted_residual"))
    for name, reason in skipped.items():
        report.left.append((name, before[name], "inverted_residual", reason))


def _root_is_replaced(model: nn.Module, family: str, classify: _Classifier | None) -> bool:
    if isinstance(model, _FUSEKIT_MODULES):
        return False
    if classify is None:  # inverted_residual: fuse_inverted_residuals' own rule
        try:
            return _fused_spec(model) is not None and not _has_hooks(model)
        except _Unsupported:
            return False
    verdict = classify(model)
    return verdict is not None and not isinstance(verdict, str)


def convert(model: nn.Module, ops: Iterable[str] | None = None, *, backend: str | None = None,
            min_kernel_size: int = 1, inverted_residual_mode: str = "recompute") -> ConversionReport:
    """Swap, in place, every supported submodule of ``model`` for its fusekit counterpart.

    ``ops``: None for every family, or some of ``FAMILIES`` ("inverted_residual",
    "inception_dwconv", "neighborhood_attention", "gqa_attention", "depthwise"), converted in that
    order. ``backend`` is given to every new module (None: auto). ``min_kernel_size`` applies to
    the plain depthwise convolutions only; ``inverted_residual_mode`` ("recompute" or "mobiletl")
    is the fused blocks' training mode. Parameters, buffers and untouched submodules are shared, so
    the state dict is unchanged and the train/eval flags, devices and dtypes carry over.

    Returns a ConversionReport: what was replaced, and what was left unchanged and why. Raises
    ValueError when ``model`` itself would be replaced (this converter works in place: convert the
    module's parent, or use the fusekit class's from_conv / from_module).
    """
    if ops is None:
        families = FAMILIES
    else:
        if isinstance(ops, str):
            raise ValueError(f"ops must be None or a collection of family names from {FAMILIES}, got the string "
                             f"{ops!r} (write ops=[{ops!r}])")
        requested = set(ops)
        unknown = sorted(requested - set(FAMILIES), key=str)
        if unknown:
            raise ValueError(f"unknown ops {unknown}; allowed: {', '.join(FAMILIES)}")
        families = tuple(f for f in FAMILIES if f in requested)
    backend = _check_backend(backend)
    _check_min_kernel_size(min_kernel_size)
    if inverted_residual_mode not in MODES:
        raise ValueError(f"inverted_residual_mode must be one of {MODES}, got {inverted_residual_mode!r}")
    classifiers: dict[str, _Classifier | None] = {
        "inverted_residual": None, "inception_dwconv": _classify_inception(backend),
        "neighborhood_attention": _classify_na(backend), "gqa_attention": _classify_gqa(backend),
        "depthwise": _classify_depthwise(backend, min_kernel_size)}
    for family in families:
        if _root_is_replaced(model, family, classifiers[family]):
            raise ValueError(f"convert swaps submodules in place, but the model itself is a {family} module "
                             f"({type(model).__name__}): convert its parent, or use the fusekit class's "
                             f"from_conv / from_module")
    report = ConversionReport()
    for family in families:
        if family == "inverted_residual":
            _convert_inverted_residuals(model, inverted_residual_mode, backend, report)
        else:
            _convert_family(model, family, classifiers[family], report)
    return report
