"""The method registry: every method declares its knobs once, in its own pydantic config, and registers itself.

Everything else is derived from the registry: the names a config may use (``MethodName``), the flat knob fields of
``MethodSpec`` and ``TrainConfig``, the ``apt-ray profile`` flags and the sweeps' default search space. A new method
is one module (or two: a light config and a torch implementation)::

    class ToyConfig(MethodConfig):
        toy_width: int = Field(4, ge=1, le=64, description="toy: bias vectors per site")

    @register_method("toy", config=ToyConfig, searchable={"toy_width": ..., "depth": DEPTH, "lr": LR})
    def apply(model, spec): ...

``apply`` may also be given as ``"package.module:function"``, imported on first use, so that registering (and so
``import apt_ray.config`` and ``apt-ray --help``) never imports torch. This module imports pydantic only.

Knobs are flat keys (``num_prompts=32`` in a trial config): a knob several methods share (``num_prompts``, ``rank``)
must be declared alike by all of them (inherit one declaration), and a method's name is unique; both are checked
when a method registers. ``unregister_method`` / ``registered_method`` undo a registration (tests).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from apt_ray.registries import RegistryError, registered_for_block, unknown_name

SiteChoice = Literal["all", "self", "cross"]
# Backbone parts the APT authors train in every method besides the method and the head: the poolers,
# the token-type embeddings and a learnable replacement of the [CLS] token ("token4classifier").
ExtraName = Literal["pooler", "token_type", "cls_token"]
AUTHORS_EXTRAS: tuple[str, ...] = ExtraName.__args__


class MethodConfig(BaseModel):
    """Base of every method's config: where the method goes and which backbone extras train with it.

    Class settings (not knobs): ``default_extras``, the extras trained when ``train_extras`` is unset;
    ``bounded_by_hidden``, knobs that may not exceed the backbone's hidden size (checked when applied and when a
    sweep's bounds are checked).
    """

    model_config = ConfigDict(extra="forbid")

    default_extras: ClassVar[tuple[str, ...]] = AUTHORS_EXTRAS
    bounded_by_hidden: ClassVar[tuple[str, ...]] = ()

    depth: int | None = Field(None, ge=1, description="number of layers carrying the method (default: all)")
    placement: Literal["bottom", "top"] = Field("bottom", description="bottom (first D layers) or top (last D layers)")
    layers: list[int] | None = Field(None, description="explicit layer indices (overrides depth/placement)")
    sites: SiteChoice | None = Field(
        None, description="which attention sites of the chosen layers: all, self or cross (default: the method's "
        "layout on this backbone, e.g. deep_prompt on METER: cross, as the APT authors' released code)")
    train_extras: list[ExtraName] | None = Field(
        None, description="backbone parts trained besides the method and the head: pooler, token_type, cls_token "
        "(default: all three, the APT authors' set; none for linear_probe and full)")


# -- search ranges -----------------------------------------------------------------------------------------------

Bound = float | Callable[[int, int], float]  # a number, or f(num_layers, hidden_size) for backbone-dependent bounds


@dataclass(frozen=True)
class Search:
    """A knob's default search range (becomes a sweep ``ParamSpec``); ``low``/``high`` may depend on the backbone."""

    type: Literal["int", "float", "categorical"]
    low: Bound | None = None
    high: Bound | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    @classmethod
    def int_range(cls, low: Bound, high: Bound, log: bool = False) -> "Search":
        return cls("int", low, high, log)

    @classmethod
    def float_range(cls, low: Bound, high: Bound, log: bool = False) -> "Search":
        return cls("float", low, high, log)

    @classmethod
    def choice(cls, *values: Any) -> "Search":
        return cls("categorical", choices=tuple(values))

    def resolve(self, num_layers: int, hidden_size: int) -> dict[str, Any]:
        """The range on one backbone, as ``ParamSpec`` keyword arguments."""
        if self.type == "categorical":
            return {"type": "categorical", "choices": list(self.choices or ())}
        at = lambda b: b(num_layers, hidden_size) if callable(b) else b  # noqa: E731
        return {"type": self.type, "low": at(self.low), "high": at(self.high), "log": self.log}


def num_layers(layers: int, hidden: int) -> int:
    """Bound: the backbone's layers that can carry a method."""
    return layers


def hidden_size(cap: int | None = None) -> Callable[[int, int], int]:
    """Bound: the backbone's hidden size (at most ``cap``)."""
    return lambda layers, hidden: hidden if cap is None else min(cap, hidden)


DEPTH = Search.int_range(1, num_layers)
LR = Search.float_range(1e-4, 3e-2, log=True)  # a trial setting, not a knob: searched by every method
PLACEMENT = {"depth": DEPTH, "placement": ...}  # ``...``: read the range from the knob's declaration


# -- entries -----------------------------------------------------------------------------------------------------

ApplyFn = Callable[[Any, Any], Any]  # (TaskModel, MethodSpec) -> AppliedMethod


@dataclass
class MethodEntry:
    """One registered method."""

    name: str
    config: type[MethodConfig]
    apply_ref: ApplyFn | str  # the function, or "module:function" imported on first use
    searchable: dict[str, Search] = field(default_factory=dict)
    origin: str = ""  # the module that registered it (for collision messages)

    @property
    def knobs(self) -> dict[str, FieldInfo]:
        return dict(self.config.model_fields)

    def load_apply(self) -> ApplyFn:
        if isinstance(self.apply_ref, str):
            module, _, attr = self.apply_ref.partition(":")
            self.apply_ref = getattr(importlib.import_module(module), attr)
        return self.apply_ref

    def config_from(self, values: dict[str, Any]) -> MethodConfig:
        """This method's config from flat keys (those it does not declare are ignored)."""
        return self.config.model_validate({k: values[k] for k in self.knobs if k in values})


_REGISTRY: dict[str, MethodEntry] = {}
_LISTENERS: list[Callable[[], None]] = []


def on_registry_change(callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` now and after every (un)registration; it may raise to refuse a registration."""
    _LISTENERS.append(callback)
    callback()
    return callback


def _notify() -> None:
    for callback in _LISTENERS:
        callback()


def _signature(info: FieldInfo) -> tuple[Any, ...]:
    return (info.annotation, repr(info.default), repr(info.default_factory), [repr(m) for m in info.metadata])


def _describe(info: FieldInfo) -> str:
    ann = getattr(info.annotation, "__name__", None) or str(info.annotation).replace("typing.", "")
    bounds = "".join(f" {m}" for m in info.metadata)
    return f"{ann}{bounds}, default {info.default!r}"


def _search_for(name: str, knob: FieldInfo | None, given: Any) -> Search:
    """A searchable entry: a ``Search``, a dict of its fields, or ``...`` to read it from the knob's declaration."""
    if isinstance(given, Search):
        return given
    if isinstance(given, dict):
        return Search(**given)
    if given is ... and knob is not None:
        ann = knob.annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)] if typing.get_origin(ann) in (typing.Union, _UnionType) else [ann]
        if len(args) == 1 and typing.get_origin(args[0]) is Literal:
            return Search.choice(*typing.get_args(args[0]))
        if args == [bool]:
            return Search.choice(False, True)
        low = next((getattr(m, "ge", None) for m in knob.metadata if getattr(m, "ge", None) is not None), None)
        high = next((getattr(m, "le", None) for m in knob.metadata if getattr(m, "le", None) is not None), None)
        if args in ([int], [float]) and low is not None and high is not None:
            return Search(args[0].__name__, low, high)
    raise TypeError(f"searchable['{name}']: give a Search (e.g. Search.int_range(1, 64, log=True)); its range cannot be "
                    "read from the config (only Literal/bool knobs and numbers with both ge and le bounds can).")


try:
    from types import UnionType as _UnionType
except ImportError:  # pragma: no cover
    _UnionType = typing.Union


def register_method(
    name: str,
    *,
    config: type[MethodConfig],
    searchable: dict[str, Any] | None = None,
    apply: ApplyFn | str | None = None,
) -> Any:
    """Register a method: ``config`` declares its knobs (a :class:`MethodConfig` subclass); ``searchable`` its default
    search space (knob or trial setting -> :class:`Search`, or ``...`` to read the range from the knob); ``apply``
    (``(model, spec) -> AppliedMethod``, or ``"module:function"``) applies it. Knob ``a_b`` becomes the
    ``apt-ray profile`` flag ``--a-b`` (``--a-b/--no-a-b`` for booleans) with the knob's description as its help.

    Without ``apply`` it is a decorator for the apply function. Raises ``ValueError`` when the name is taken or a knob
    clashes with another method's declaration of the same key; nothing is registered then.
    """
    if apply is None:
        def decorator(fn: ApplyFn) -> ApplyFn:
            register_method(name, config=config, searchable=searchable, apply=fn)
            return fn
        return decorator

    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"method name {name!r} is not a valid identifier: use letters, digits and underscores.")
    if not (isinstance(config, type) and issubclass(config, MethodConfig)):
        raise TypeError(f"method '{name}': config must be a subclass of apt_ray.methods.registry.MethodConfig.")
    origin = apply.__module__ if callable(apply) else apply.partition(":")[0]
    if name in _REGISTRY:
        other = _REGISTRY[name]
        raise RegistryError(f"method '{name}' is registered twice: by {other.origin} and by {origin}. "
                         "Method names are unique: rename one of them.")
    for entry in _REGISTRY.values():
        for knob, info in config.model_fields.items():
            theirs = entry.config.model_fields.get(knob)
            if theirs is not None and _signature(theirs) != _signature(info):
                raise RegistryError(
                    f"method '{name}': knob '{knob}' ({_describe(info)}) clashes with the '{knob}' of method '{entry.name}' "
                    f"({_describe(theirs)}). Knobs are flat trial settings, so a shared key needs one declaration: "
                    f"inherit it from {entry.name}'s config or give the knob another name (e.g. '{name}_{knob}')."
                )
    searches = {k: _search_for(k, config.model_fields.get(k), v) for k, v in (searchable or {}).items()}
    _REGISTRY[name] = MethodEntry(name, config, apply, searches, origin)
    try:
        _notify()
    except Exception:
        del _REGISTRY[name]
        _notify()
        raise
    return _REGISTRY[name]


def unregister_method(name: str) -> MethodEntry:
    """Remove a registered method (and its knobs, where no other method declares them)."""
    entry = _REGISTRY.pop(name)
    _notify()
    return entry


def registered_method(name: str, *, config: type[MethodConfig], apply: ApplyFn | str,
                      searchable: dict[str, Any] | None = None) -> contextlib.AbstractContextManager[MethodEntry]:
    """Register a method for the duration of a ``with`` block."""
    return registered_for_block(_REGISTRY, name, lambda: register_method(name, config=config, searchable=searchable, apply=apply),
                                unregister_method)


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)


def unknown_method_message(name: str) -> str:
    return unknown_name("method", name, _REGISTRY)


def get_method(name: str) -> MethodEntry:
    """The registered method ``name``; a ``UserError`` listing the registered ones (with a did-you-mean) otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        from apt_ray.errors import UserError

        raise UserError(unknown_method_message(name) + ".") from None


def _known_method(name: str) -> str:
    if name not in _REGISTRY:
        raise PydanticCustomError("unknown_method", unknown_method_message(name).replace("{", "{{").replace("}", "}}"))
    return name


# A registered method's name, checked against the live registry (a method registered later is accepted too).
MethodName = typing.Annotated[str, AfterValidator(_known_method)]


def knob_fields() -> dict[str, FieldInfo]:
    """Every registered knob, once: the shared placement knobs, then the methods' own in registration order (their
    declarations agree, see ``register_method``)."""
    out: dict[str, FieldInfo] = dict(MethodConfig.model_fields)  # the shared placement knobs first
    for entry in _REGISTRY.values():
        for knob, info in entry.config.model_fields.items():
            out.setdefault(knob, info)
    return out


def knob_users(knob: str) -> list[str]:
    """The methods that declare ``knob``."""
    return [e.name for e in _REGISTRY.values() if knob in e.config.model_fields]


def sync_knob_fields(model: type[BaseModel], after: str) -> None:
    """Give the flat pydantic ``model`` one field per registered knob (copies of the declarations), right after its
    field ``after``, replacing the knob fields of an earlier sync; rebuilds its validator in place so that every
    importer of ``model`` sees methods registered later. Raises ``ValueError`` when a knob would shadow a field."""
    knobs = knob_fields()
    previous = set(getattr(model, "__method_knobs__", ()))
    own = {k: v for k, v in model.__pydantic_fields__.items() if k not in previous}
    shadowed = sorted(set(knobs) & set(own))
    if shadowed:
        named = "; ".join(f"'{k}' of {'/'.join(knob_users(k))}" for k in shadowed)
        raise ValueError(f"knob {named} would shadow the setting of the same name in {model.__name__}: "
                         "give the knob another name.")
    fields: dict[str, FieldInfo] = {}
    for key, info in own.items():
        fields[key] = info
        if key == after:
            fields.update({k: copy.copy(v) for k, v in knobs.items()})
    model.__pydantic_fields__.clear()
    model.__pydantic_fields__.update(fields)
    model.__method_knobs__ = tuple(knobs)
    model.model_rebuild(force=True)


def load_builtins() -> None:
    """Register the methods apt_ray ships (their light config modules; idempotent)."""
    importlib.import_module("apt_ray.methods.configs")
