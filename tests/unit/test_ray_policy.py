"""The Ray Serve autoscaling policy on waiting requests (plain Python: Ray is not imported), and the deployment's
autoscaling settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenwire.config import Settings
from tokenwire.server.running.ray_app import WaitingRequestsPolicy, autoscaling_config


@dataclass
class Ctx:
    """The fields of Ray Serve's AutoscalingContext the policy reads."""

    current_num_replicas: int
    aggregated_metrics: dict[str, dict[str, float]]
    current_time: float
    policy_state: dict[str, Any] = field(default_factory=dict)


def metrics(waiting: list[float], running: list[float], batch: float = 64) -> dict[str, dict[str, float]]:
    return {
        "waiting": {f"r{i}": w for i, w in enumerate(waiting)},
        "running": {f"r{i}": r for i, r in enumerate(running)},
        "max_batch_size": {f"r{i}": batch for i in range(len(waiting))},
    }


def test_it_adds_replicas_for_the_requests_that_wait() -> None:
    policy = WaitingRequestsPolicy(target_waiting=4)
    assert policy(Ctx(2, metrics([3, 4], [64, 64]), 0.0))[0] == 2  # 7 waiting: under 4 per replica
    assert policy(Ctx(2, metrics([10, 10], [64, 64]), 0.0))[0] == 5  # 20 waiting: 5 replicas' worth
    assert policy(Ctx(2, metrics([5, 4], [64, 64]), 0.0))[0] == 3  # just over: at least one more


def test_it_removes_one_replica_only_after_a_quiet_period() -> None:
    policy = WaitingRequestsPolicy(target_waiting=4, quiet_s=60)
    quiet = metrics([0, 0, 0], [5, 3, 2])
    n, state = policy(Ctx(3, quiet, 100.0))
    assert n == 3 and state["quiet_since"] == 100.0
    n, state = policy(Ctx(3, quiet, 130.0, state))
    assert n == 3  # not yet
    busy = metrics([0, 0, 0], [60, 60, 60])
    n, state = policy(Ctx(3, busy, 140.0, state))
    assert n == 3 and "quiet_since" not in state  # busy batches: the quiet period starts again
    n, state = policy(Ctx(3, quiet, 150.0, state))
    n, state = policy(Ctx(3, quiet, 211.0, state))
    assert n == 2  # a quiet minute: one fewer


def test_the_deployment_autoscales_with_this_policy_between_the_settings_bounds() -> None:
    config = autoscaling_config(Settings(replicas=2, max_replicas=6, ray_target_waiting=3))
    assert config["min_replicas"] == 2 and config["initial_replicas"] == 2 and config["max_replicas"] == 6
    assert config["policy"]["policy_function"] == "tokenwire.server.running.ray_app:WaitingRequestsPolicy"
    assert config["policy"]["policy_kwargs"] == {"target_waiting": 3}
