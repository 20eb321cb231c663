"""Comparison report: a results table, loss curves as PNG, sample GIFs and the config.

Writes the same content twice: `report.md` for reading in a repository and `report.html` for a
browser (GIFs play inline in both).
"""

import html
import json
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
from matplotlib import pyplot as plt  # noqa: E402


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """Read all records of a run's `metrics.jsonl`, in the order written."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_loss_curves(runs: dict[str, str], output_path: str, key: str = "loss") -> str:
  """Plot `key` against step for each named run's workdir into one PNG."""
  figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
  for name, workdir in runs.items():
    # A resumed run logs again the steps after its checkpoint; the latest record of a step wins.
    by_step = {r["step"]: r[key] for r in read_metrics(workdir) if key in r}
    steps = sorted(by_step)
    axis.plot(steps, [by_step[step] for step in steps], label=name)
  axis.set_xlabel("step")
  axis.set_ylabel(f"training {key}")
  axis.set_yscale("log")
  axis.grid(alpha=0.3)
  axis.legend()
  figure.tight_layout()
  figure.savefig(output_path)
  plt.close(figure)
  return output_path


def markdown_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    lines.append("| " + " | ".join(_format(row.get(column, "")) for column in columns) + " |")
  return "\n".join(lines)


def _html_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
  head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
  body = "".join(
      "<tr>" + "".join(f"<td>{html.escape(_format(row.get(c, '')))}</td>" for c in columns) +
      "</tr>" for row in rows)
  return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _format(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.3e}"
  if isinstance(value, int):
    return f"{value:,}"
  return str(value)


def write_report(output_dir: str, *, title: str, summary: str, columns: list[str],
                 rows: list[dict[str, Any]], figures: dict[str, str], notes: list[str],
                 config: dict[str, Any]) -> tuple[str, str]:
  """Write report.md and report.html into `output_dir`; figure paths are made relative to it.

  Returns:
    The paths of the Markdown and HTML reports.
  """
  relative = {caption: os.path.relpath(path, output_dir) for caption, path in figures.items()}
  config_text = json.dumps(config, indent=2, sort_keys=True)

  markdown = [f"# {title}", "", summary, "", markdown_table(columns, rows), ""]
  markdown += [f"- {note}" for note in notes] + [""]
  for caption, path in relative.items():
    markdown += [f"## {caption}", "", f"![{caption}]({path})", ""]
  markdown += ["## Config", "", "```json", config_text, "```", ""]
  md_path = os.path.join(output_dir, "report.md")
  with open(md_path, "w", encoding="utf-8") as f:
    f.write("\n".join(markdown))

  figures_html = "".join(
      f"<h2>{html.escape(caption)}</h2><img src=\"{html.escape(path)}\" alt=\"{html.escape(caption)}\">"
      for caption, path in relative.items())
  notes_html = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
  page = (
      "<!doctype html><html><head><meta charset=\"utf-8\">"
      f"<title>{html.escape(title)}</title><style>"
      "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
      "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:4px 8px;"
      "text-align:right}img{image-rendering:pixelated;max-width:100%}"
      "</style></head><body>"
      f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>"
      f"{_html_table(columns, rows)}<ul>{notes_html}</ul>{figures_html}"
      f"<h2>Config</h2><pre>{html.escape(config_text)}</pre></body></html>")
  html_path = os.path.join(output_dir, "report.html")
  with open(html_path, "w", encoding="utf-8") as f:
    f.write(page)
  return md_path, html_path
