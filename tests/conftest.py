import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))  # tiny_models

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family, **overrides) -> checkpoint dir, built once per (family, overrides)."""
    from tiny_models import build_tiny
    cache = {}

    def make(family: str, **overrides) -> str:
        key = (family, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in overrides.items())))
        if key not in cache:
            cache[key] = build_tiny(family, str(tmp_path_factory.mktemp(family)), **overrides)
        return cache[key]
    return make


@pytest.fixture(scope="module")
def ray_session():
    """One private local Ray per test module; deployments join it (and do not stop it)."""
    import ray

    from cluster.ray_env import start_ray
    started = start_ray()
    yield
    if started:
        ray.shutdown()
