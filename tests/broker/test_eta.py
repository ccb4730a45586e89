"""The queued ETA estimate (broker/eta.py) from workers' measured step times."""

from broker.eta import queued_eta_s, run_time_s
from protocol.job import Job


class FakeWorker:
    def __init__(self, table: dict[str, float]):
        self.table = table

    def step_time_s(self, model, width, height):
        return self.table.get(f"{model}@{width}x{height}")

def job(**fields) -> Job:
    return Job.model_validate({"request_id": "e", "prompt": "p", "models": {"base": "m"},
                               "width": 512, "height": 512, "steps": 10, **fields})

def test_run_time_uses_the_fastest_measured_worker():
    workers = [FakeWorker({"m@512x512": 0.5}), FakeWorker({"m@512x512": 0.2}), FakeWorker({})]
    assert run_time_s(job(), workers) == 2.0
    assert run_time_s(job(init_image="x", strength=0.5), workers) == 1.0

def test_queued_eta_grows_with_the_position_and_shrinks_with_workers():
    one = [FakeWorker({"m@512x512": 0.1})]
    two = one * 2
    assert queued_eta_s(job(), 0, one) == 1.0
    assert queued_eta_s(job(), 3, one) == 4.0
    assert queued_eta_s(job(), 3, two) == 2.0

def test_no_measurement_or_no_worker_means_no_eta():
    assert queued_eta_s(job(), 0, [FakeWorker({})]) is None
    assert queued_eta_s(job(), 0, []) is None
    assert queued_eta_s(job(), None, [FakeWorker({"m@512x512": 0.1})]) is None
