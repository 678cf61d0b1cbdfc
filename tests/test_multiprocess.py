"""Every experiment runner, whole (train -> export -> sample -> evaluate -> record), under two processes.

accelerate 1.15's ``end_training()`` destroys the process group; a runner that ended training that way died at the
first sampling barrier after a full training (issue 26). These run each runner's smoke scale under
``torchrun --nproc_per_node 2`` on the CPU (gloo) and check the records were written once.
"""

import json
import os
import subprocess

import pytest

from tests.conftest import ROOT

RUNNERS = [  # (experiment, one preset): the unconditional, inpainting and text-to-image paths
    ("unconditional", "mini-digits16-conprediff"),
    ("inpainting", "mini-digits16-baseline"),
    ("text_to_image", "mini-digits16-t2i-baseline"),
]


@pytest.mark.parametrize("experiment,preset", RUNNERS)
def test_runner_survives_two_processes(experiment, preset, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "1"}
    port = str(29650 + [r[0] for r in RUNNERS].index(experiment))
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", port, "-m", f"experiments.{experiment}",
           "--scale", "smoke", "--presets", preset, "--runs-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "process group has not been initialized" not in proc.stderr
    records = [json.loads(line) for line in (tmp_path / "smoke-records.jsonl").read_text().splitlines()]
    assert records, "nothing recorded"
    keys = [(r["metric"], r["benchmark"], r["sampler"]) for r in records]
    assert len(keys) == len(set(keys)), "a measurement was recorded twice (once per process)"
    assert {r["experiment"] for r in records} == {experiment}
    run = tmp_path / "smoke" / f"{preset}-s0"
    assert json.loads((run / "env.json").read_text())["num_processes"] == 2
    if experiment != "unconditional":
        return
    # a second invocation resumes the finished run, records nothing new and still exits cleanly
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len((tmp_path / "smoke-records.jsonl").read_text().splitlines()) == len(records)
