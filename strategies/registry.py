"""Strategy plugins: classes registered under the ``hetfed.strategies`` entry-point group.

hetfed's own strategies register exactly like a third-party package would, in its
``pyproject.toml``::

    [project.entry-points."hetfed.strategies"]
    my-method = "my_package.my_module:MyStrategy"

A registered class is checked when it is loaded (see :func:`load_plugin`); a plugin that fails
names itself and its package instead of crashing hetfed. ``docs/writing-a-strategy.md`` walks
through a complete plugin (``examples/hetfed-ffa-lora``).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from hetfed.errors import ConfigError, PluginError
from strategies.base import LoRAStrategy

GROUP = "hetfed.strategies"


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    target: str  # "module:Class"
    package: str  # the distribution that registers it
    description: str
    error: str = ""  # why the plugin could not be loaded, if it could not


def _entry_points() -> dict[str, list[EntryPoint]]:
    """Entry points by name; a name that two packages register has two."""
    points: dict[str, list[EntryPoint]] = {}
    for point in entry_points(group=GROUP):
        points.setdefault(point.name, []).append(point)
    return points


def _package(point: EntryPoint) -> str:
    return point.dist.name if point.dist else "an unknown package"


def strategy_names() -> list[str]:
    return sorted(_entry_points())


def load_plugin(name: str, points: list[EntryPoint]) -> type:
    """Import the class registered as ``name`` and check that hetfed can run it.

    It must be the only class registered under ``name``, import without error, subclass
    :class:`strategies.base.LoRAStrategy` with every abstract hook implemented, declare the same
    ``name`` (run-config options are keyed by the registered name, results by the class's) and
    have a dataclass (or None) as ``options_class``. Raises :class:`PluginError` otherwise.
    """
    if len(points) > 1:
        owners = ", ".join(f"{p.value} ({_package(p)})" for p in points)
        raise PluginError(f"'{name}' is registered by more than one package: {owners}")
    point = points[0]
    where = f"{point.value} from package {_package(point)}"
    try:
        cls = point.load()
    except Exception as err:  # a broken plugin must name itself, not crash hetfed
        raise PluginError(f"{where} failed to import: {type(err).__name__}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, LoRAStrategy)):
        raise PluginError(f"{where} is not a subclass of strategies.base.LoRAStrategy")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise PluginError(f"{where} does not implement {missing}")
    if cls.name != name:
        raise PluginError(f"{where} is registered as '{name}' but its name is {cls.name!r}")
    if cls.options_class is not None and not dataclasses.is_dataclass(cls.options_class):
        raise PluginError(f"{where} has an options_class that is not a dataclass")
    return cls


def load_strategy(name: str) -> type:
    """The strategy class registered as ``name``; unknown names list the registered ones."""
    points = _entry_points()
    if name not in points:
        raise ConfigError("strategy", name, f"a registered strategy: {', '.join(sorted(points))}")
    try:
        return load_plugin(name, points[name])
    except PluginError as err:
        raise ConfigError("strategy", name, f"a usable plugin; {err}") from err


def describe_strategies() -> list[StrategyInfo]:
    """Every registered strategy with its one-line description (or why it cannot be used)."""
    rows = []
    for name, points in sorted(_entry_points().items()):
        target = " | ".join(p.value for p in points)
        package = " | ".join(_package(p) for p in points)
        try:
            cls = load_plugin(name, points)
            lines = str(cls.description or cls.__doc__ or "").strip().splitlines()
            rows.append(StrategyInfo(name, target, package, lines[0] if lines else ""))
        except PluginError as err:  # listed with its error so one bad plugin hides no other
            rows.append(StrategyInfo(name, target, package, "", error=str(err)))
    return rows


def strategies_table() -> str:
    """``hetfed strategies``: name, class, package and description of every registered
    strategy, a broken plugin with the reason it cannot be used."""
    table = [("name", "class", "package", "description")] + [
        (r.name, r.target, r.package, f"BROKEN PLUGIN: {r.error}" if r.error else r.description)
        for r in describe_strategies()
    ]
    widths = [max(len(line[i]) for line in table) for i in range(3)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(cells, widths, strict=True)), text])
        for *cells, text in table
    )
