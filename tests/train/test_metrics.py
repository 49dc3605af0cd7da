"""metrics.jsonl on resume."""

import json

import numpy as np

from jaxflip.train.metrics import MetricsLogger


def test_resume_drops_later_steps_and_a_line_cut_short_by_a_kill(tmp_path):
    rng = np.random.default_rng()
    records = [{"step": step, "loss": float(rng.uniform(1, 9))} for step in range(1, 8)]
    whole = "".join(json.dumps(record) + "\n" for record in records)
    (tmp_path / "metrics.jsonl").write_text(whole + json.dumps({"step": 8, "loss": 1.5})[:11])
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.truncate_after(5)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == records[:5]
    logger.log({"step": 6, "loss": 2.0})
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]) == {"step": 6, "loss": 2.0}
