"""The comparison job end to end on the smoke config: every stage runs and the report is whole."""

import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
MODELS = ("maskgit", "walt", "tokenizer reconstruction", "random tokens")


def test_smoke_comparison_writes_report(tmp_path):
  command = [sys.executable, "-m", "launch.compare", "--config=configs/compare.py:smoke",
             f"--workdir={tmp_path}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

  report = (tmp_path / "report.md").read_text()
  for model in MODELS:
    row = re.search(rf"^\| {model} \| ([0-9.,]+) \|", report, re.MULTILINE)
    assert row, f"no FVD row for {model!r} in report.md:\n{report[:2000]}"
    assert float(row.group(1).replace(",", "")) >= 0.0

  # Both generators report their size, cost and timings, measured in this run.
  for model in ("maskgit", "walt"):
    cells = re.search(rf"^\| {model} \|(.*)\|$", report, re.MULTILINE).group(1).split("|")
    assert all(cell.strip() for cell in cells), cells

  html = (tmp_path / "report.html").read_text()
  assert "<table>" in html
  assert "random tokens" in html
  assert (tmp_path / "loss_curves.png").stat().st_size > 0
  for name in ("real", "maskgit", "walt", "tokenizer_reconstruction", "random_tokens"):
    assert (tmp_path / "samples" / f"{name}.gif").stat().st_size > 0
  assert '"generator_steps": 4' in report
