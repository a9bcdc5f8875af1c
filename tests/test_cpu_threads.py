"""The model's CPU threads follow the cores other processes leave free (`pipeline.cpu_threads`)."""

from __future__ import annotations

import pytest

from omg_llava_ros.pipeline import PerceptionPipeline, PipelineConfig
from omg_llava_ros.pipeline.cpu_threads import ThreadGovernor, machine_busy_seconds, shared_governor


class FakeMachine:
    """A 2-core machine whose other processes use `others` cores while this one uses `own`."""

    def __init__(self) -> None:
        self.now = 0.0
        self.busy = 0.0
        self.own_total = 0.0
        self.others = 0.0
        self.own = 1.0
        self.torch_threads = 2

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.busy += (self.others + self.own) * seconds
        self.own_total += self.own * seconds

    def governor(self, period_s: float = 2.0) -> ThreadGovernor:
        return ThreadGovernor(
            cores=2,
            period_s=period_s,
            read_machine=lambda: self.busy,
            read_self=lambda: self.own_total,
            clock=lambda: self.now,
            torch_threads=(lambda: self.torch_threads, self._set),
        )

    def _set(self, n: int) -> None:
        self.torch_threads = n


class FakeVision:
    def __init__(self) -> None:
        self.threads = 2
        self.calls: list[int] = []

    def set_threads(self, n: int) -> None:
        self.threads = n
        self.calls.append(n)


def test_busy_neighbours_take_the_model_to_one_thread_and_an_idle_machine_back_to_two():
    machine, vision = FakeMachine(), FakeVision()
    governor = machine.governor()
    assert governor.max_threads == 2  # torch's count when it was made
    machine.advance(2.5)
    assert governor.tick(vision) == 2 and governor.others == pytest.approx(0.0)

    machine.others = 1.5  # two busy processes get 1.5 of the 2 cores beside us
    machine.advance(1.0)
    assert governor.tick(vision) == 2  # not a whole period yet: no decision
    machine.advance(1.5)
    assert governor.tick(vision) == 1
    assert machine.torch_threads == 1 and vision.calls == [1]

    machine.others = 0.9
    machine.advance(2.0)
    assert governor.tick(vision) == 1  # one core still taken: stay on one
    machine.others = 0.1
    machine.advance(2.0)
    assert governor.tick(vision) == 2
    assert machine.torch_threads == 2 and vision.calls == [1, 2] and governor.changes == 2


def test_the_governor_keeps_a_vision_and_torch_in_step_and_never_exceeds_its_maximum():
    machine, vision = FakeMachine(), FakeVision()
    machine.torch_threads = 1  # the user asked for one thread (--threads 1)
    governor = machine.governor()
    assert governor.max_threads == 1
    machine.advance(3.0)
    assert governor.tick(vision) == 1 and vision.calls == [1]  # a 2-thread vision is brought to 1
    machine.torch_threads = 4  # something else changed torch's count
    governor.tick(vision)
    assert machine.torch_threads == 1
    with pytest.raises(ValueError, match="period_s"):
        machine.governor(period_s=0)


def test_without_a_machine_reading_nothing_is_changed():
    machine, vision = FakeMachine(), FakeVision()
    governor = ThreadGovernor(
        cores=2, read_machine=lambda: None, clock=lambda: machine.now, torch_threads=(lambda: 2, machine._set)
    )
    machine.torch_threads = 7
    machine.advance(10)
    assert governor.tick(vision) == 2 and machine.torch_threads == 7 and vision.calls == []


def test_the_machine_reading_counts_busy_seconds_here():
    first = machine_busy_seconds()
    assert first is not None and first > 0  # the CI machine is Linux
    sum(i * i for i in range(300_000))
    assert machine_busy_seconds() >= first


def test_a_cpu_pipeline_shares_the_process_governor_and_can_turn_it_off(tiny_model):
    assert PerceptionPipeline(tiny_model).threads is shared_governor()
    assert PerceptionPipeline(tiny_model, PipelineConfig(adapt_threads=False)).threads is None


@pytest.mark.parametrize(
    "given, expected",
    [({}, "20000"), ({"GOMP_SPINCOUNT": "5"}, "5"), ({"OMP_WAIT_POLICY": "active"}, None)],
)
def test_importing_the_package_shortens_openmp_spinning_unless_the_user_chose(given, expected):
    """PyTorch's libgomp reads the variable when torch loads: the package sets it on import, first."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = "import os, omg_llava_ros, torch; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env={**env, **given}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expected)
