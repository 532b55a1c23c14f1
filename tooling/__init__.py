"""hetfed's tooling: the ``hetfed`` command, scenarios, sweeps and benchmarks.

It uses the core (``hetfed``), the strategies and the apps; nothing below imports it.
"""
