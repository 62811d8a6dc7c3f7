"""Settings for the whole suite."""

from hypothesis import settings

# Speed is measured by the benchmarks in scripts/, never by tests: Hypothesis's per-example
# deadline (200 ms) only turns a loaded CI machine into a flaky failure.
settings.register_profile("frugal", deadline=None)
settings.load_profile("frugal")
