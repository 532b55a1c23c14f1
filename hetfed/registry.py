"""Strategy plugins: classes registered under the ``hetfed.strategies`` entry-point group.

hetfed's own strategies register exactly like a third-party package would, in its
``pyproject.toml``::

    [project.entry-points."hetfed.strategies"]
    my-method = "my_package.my_module:MyStrategy"
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from hetfed.errors import ConfigError

GROUP = "hetfed.strategies"


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    target: str  # "module:Class"
    description: str
    error: str = ""  # why the plugin could not be loaded, if it could not


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def strategy_names() -> list[str]:
    return sorted(_entry_points())


def load_strategy(name: str) -> type:
    """The strategy class registered as ``name``; unknown names list the registered ones."""
    points = _entry_points()
    if name not in points:
        raise ConfigError("strategy", name, f"a registered strategy: {', '.join(sorted(points))}")
    point = points[name]
    try:
        cls = point.load()
    except Exception as err:  # a broken plugin must name itself, not crash hetfed
        package = point.dist.name if point.dist else point.value
        raise ConfigError(
            "strategy", name, f"a loadable plugin; {point.value} from {package} failed: {err}"
        ) from err
    return cls


def describe_strategies() -> list[StrategyInfo]:
    """Every registered strategy with its one-line description (or why it failed to load)."""
    rows = []
    for name, point in sorted(_entry_points().items()):
        try:
            cls = point.load()
            description = (getattr(cls, "description", "") or (cls.__doc__ or "")).strip()
            rows.append(StrategyInfo(name, point.value, description.splitlines()[0]))
        except Exception as err:  # listed with its error so one bad plugin hides no other
            rows.append(StrategyInfo(name, point.value, "", error=f"{type(err).__name__}: {err}"))
    return rows
