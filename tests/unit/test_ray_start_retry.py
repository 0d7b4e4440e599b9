"""start_ray retries Ray's own start-up timeouts (seen on a busy 2-core VM) and nothing else."""

import pytest

import cluster.ray_env as ray_env


class FakeRay:
    def __init__(self, errors):
        self.errors = list(errors)
        self.inits = 0
        self.shutdowns = 0

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        self.inits += 1
        if self.errors:
            raise self.errors.pop(0)

    def shutdown(self):
        self.shutdowns += 1


@pytest.mark.parametrize("message", ["The current node timed out during startup. This could happen because ...",
                                     "Timed out waiting for file /tmp/ray/session_x/gcs_server_port_abc"])
def test_start_up_timeouts_are_retried(monkeypatch, message):
    fake = FakeRay([Exception(message)])
    monkeypatch.setattr(ray_env, "ray", fake)
    assert ray_env.start_ray() is True
    assert (fake.inits, fake.shutdowns) == (2, 1)


def test_other_errors_and_the_last_attempt_are_raised(monkeypatch):
    fake = FakeRay([ValueError("bad num_cpus")])
    monkeypatch.setattr(ray_env, "ray", fake)
    with pytest.raises(ValueError, match="bad num_cpus"):
        ray_env.start_ray()
    fake = FakeRay([Exception("Timed out waiting for file x")] * ray_env.STARTUP_ATTEMPTS)
    monkeypatch.setattr(ray_env, "ray", fake)
    with pytest.raises(Exception, match="Timed out waiting for file"):
        ray_env.start_ray()
    assert fake.inits == ray_env.STARTUP_ATTEMPTS
