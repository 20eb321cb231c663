"""Two JAX processes on 127.0.0.1 train, checkpoint and resume one run together."""

import os
import pathlib
import socket
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _launch_pair(workdir, num_steps):
  port = _free_port()
  processes = []
  for process_id in range(2):
    env = dict(os.environ,
               JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(process_id))
    command = [sys.executable, "-m", "launch.train", "--config=configs/magvit.py:smoke",
               f"--workdir={workdir}", f"--config.train.num_steps={num_steps}"]
    processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-4000:]
  return outputs


def test_two_processes_train_and_resume(tmp_path):
  outputs = _launch_pair(tmp_path, num_steps=2)
  assert "JAX process 0 of 2, 1 local / 2 global devices" in outputs[0]
  assert "JAX process 1 of 2, 1 local / 2 global devices" in outputs[1]
  assert (tmp_path / "checkpoints" / "2").is_dir()

  # Only process 0 writes metrics, so each step appears once.
  steps = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
           if '"loss"' in line]
  assert len(steps) == 2

  outputs = _launch_pair(tmp_path, num_steps=4)
  assert all("Resumed from step 2" in output for output in outputs)
  assert (tmp_path / "checkpoints" / "4").is_dir()
