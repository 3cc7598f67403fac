"""Which served model variant runs a hosted route, so a route never silently runs a different model than it names.

Each served variant is named (the preset names: ``24B-distill``, ``4.5B-distill``, ...; ``tiny``; a weights folder
gets its folder's name or the ``NAME=PATH`` name it was given) and described by what it is: its size class (24B,
4.5B, or none for the tiny preset and unknown shapes) and whether it is distilled. Each hosted route promises a
kind of model:

* WaveSpeed ``magi-1-24b`` a 24B variant, ``magi-1-24b-distill`` a distilled 24B, ``magi-1-4.5b`` a 4.5B,
  ``magi-1-4.5b-distill`` a distilled 4.5B;
* fal ``fal-ai/magi`` (and ``/image-to-video``) a base (not distilled) model, ``fal-ai/magi-distilled`` (and
  ``/image-to-video``) a distilled one;
* Magic Hour names no size: the first served variant, unless the operator maps it.

:meth:`Router.resolve` picks the first served variant that keeps the route's promise (quantized variants keep the
promise of their unquantized kin). Without one, a *stand-in* may run it: a variant of no known size (the tiny
random preset, a custom shape) stands in for any route, a distilled one preferably for distilled routes; such a
run is reported under the variant's own name (``data.model`` says ``tiny``), never the route's. With neither,
the route is refused with a 4xx that names the variants this server runs (:class:`UnservedRoute`). The operator
can map routes explicitly (``--route-map ROUTE=VARIANT``); a mapping that breaks the promise is honoured and, again,
reported under the variant's name.

Torch-free (the HTTP layer): variants are described by the composition root from their configs.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from magi_server.params import ModelLimits

SIZES = ("24B", "4.5B")


@dataclass(frozen=True)
class Variant:
    """A model variant this deployment serves: ``size`` "24B", "4.5B" or None (tiny, custom), ``distill``."""

    name: str
    size: str | None
    distill: bool
    limits: ModelLimits = field(default_factory=ModelLimits)

    @property
    def stand_in(self) -> bool:
        return self.size is None


@dataclass(frozen=True)
class Promise:
    """What a route promises: a size (None: any) and distillation (None: either)."""

    size: str | None = None
    distill: bool | None = None

    def kept_by(self, variant: Variant) -> bool:
        return (not variant.stand_in and (self.size is None or variant.size == self.size)
                and (self.distill is None or variant.distill == self.distill))

    def describe(self) -> str:
        kind = {None: "a", True: "a distilled", False: "a base (not distilled)"}[self.distill]
        return f"{kind} {self.size} MAGI-1 model" if self.size else f"{kind} MAGI-1 model"


ROUTE_PROMISES: Mapping[str, Promise] = {
    "wavespeed-ai/magi-1-24b": Promise("24B"),
    "wavespeed-ai/magi-1-24b-distill": Promise("24B", True),
    "wavespeed-ai/magi-1-4.5b": Promise("4.5B"),
    "wavespeed-ai/magi-1-4.5b-distill": Promise("4.5B", True),
    "fal-ai/magi": Promise(distill=False),
    "fal-ai/magi/image-to-video": Promise(distill=False),
    "fal-ai/magi-distilled": Promise(distill=True),
    "fal-ai/magi-distilled/image-to-video": Promise(distill=True),
    "magichour": Promise(),
}


class UnservedRoute(Exception):
    """No served variant keeps the route's promise (answer a 4xx in the route's provider format)."""

    def __init__(self, route: str, promise: Promise, served: Iterable[str]) -> None:
        served = list(served)
        super().__init__(f"{route} runs {promise.describe()}, which this server does not serve; it serves "
                         f"{', '.join(served) or 'no model'} (an operator can map routes with --route-map)")
        self.route, self.served = route, served


class RouteMapError(ValueError):
    pass


@dataclass(frozen=True)
class Choice:
    """The variant a route runs and the name responses give it (``model``): the route's own id when the variant
    keeps the route's promise, else the variant's name."""

    variant: Variant
    model: str


class Router:
    """Routes -> served variants (see the module docstring). ``route_map``: route -> variant name."""

    def __init__(self, variants: Iterable[Variant], route_map: Mapping[str, str] | None = None) -> None:
        self.variants = tuple(variants)
        if not self.variants:
            raise ValueError("a router needs at least one variant")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"two served variants share a name: {names}")
        self._by_name = {v.name: v for v in self.variants}
        self.route_map = dict(route_map or {})
        for route, name in self.route_map.items():
            if route not in ROUTE_PROMISES:
                raise RouteMapError(f"--route-map: unknown route {route!r}; routes: {', '.join(ROUTE_PROMISES)}")
            if name not in self._by_name:
                raise RouteMapError(f"--route-map: {route} -> {name!r}, which is not served; served: "
                                    f"{', '.join(names)}")

    @property
    def served(self) -> list[str]:
        return [v.name for v in self.variants]

    def variant(self, name: str | None) -> Variant | None:
        return self._by_name.get(name) if name is not None else None

    def resolve(self, route: str) -> Choice:
        """The variant ``route`` runs; UnservedRoute when none may."""
        promise = ROUTE_PROMISES.get(route, Promise())
        mapped = self.route_map.get(route)
        if mapped is not None:
            variant = self._by_name[mapped]
        else:
            variant = next((v for v in self.variants if promise.kept_by(v)), None)
            if variant is None:
                stand_ins = [v for v in self.variants if v.stand_in]
                variant = next((v for v in stand_ins if promise.distill in (None, v.distill)),
                               stand_ins[0] if stand_ins else None)
            if variant is None:
                raise UnservedRoute(route, promise, self.served)
        return Choice(variant, route if promise.kept_by(variant) else variant.name)


def size_class(hidden_size: int) -> str | None:
    """The size class of a DiT by its width (the two released shapes), None for any other (tiny, custom)."""
    return {6144: "24B", 3072: "4.5B"}.get(int(hidden_size))


def parse_route_map(items: Iterable[str]) -> dict[str, str]:
    """``["fal-ai/magi=4.5B-distill", ...]`` -> {route: variant}; RouteMapError naming a malformed item."""
    mapping = {}
    for item in items:
        route, sep, name = item.partition("=")
        if not sep or not route.strip() or not name.strip():
            raise RouteMapError(f"--route-map: expected ROUTE=VARIANT, got {item!r}")
        mapping[route.strip()] = name.strip()
    return mapping
