import pytest


@pytest.fixture(scope="module")
def ray_session():
    """One private local Ray per test module; deployments join it (and do not stop it)."""
    import ray

    from cluster.ray_env import start_ray
    started = start_ray()
    yield
    if started:
        ray.shutdown()
