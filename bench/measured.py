"""The measured figures of README.md and docs/*.md, from commands: a snapshot of the default run and its blocks.

    .venv/bin/python bench/measured.py refresh [results_dir]   # after `make run`: snapshot, bench output, blocks
    .venv/bin/python bench/measured.py refresh results-decay-map --snapshot decay-map   # after the decay map
    .venv/bin/python bench/measured.py check                   # blocks == what their commands print on the snapshot
    .venv/bin/python bench/measured.py blocks                  # rewrite the blocks from the snapshot as it is

`refresh` copies the run's results dataset (the small Parquet tables, not checkpoints) to docs/measured/default/,
with the default config's hash and the output of bench/workflow_jobs.py on that run (timings cannot be recomputed
from a snapshot, so they are kept as the bench printed them), then rewrites every block of README.md and docs/*.md

    <!-- measured: NAME -->
    ```
    ...
    ```
    <!-- /measured -->

with what BLOCKS[NAME] prints on the snapshot. `check` (run by tests/test_readme.py) fails when a block differs from
its command's output or when the snapshot is not of the current default config: change the default, rerun
`make run` and `refresh`.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = REPO_ROOT / "docs" / "measured" / "default"
DECAY_MAP = REPO_ROOT / "docs" / "measured" / "decay-map"  # config/experiments/decay-map.yaml's run (docs/science.md)
# snapshot name -> (its folder, the config its run must be of, figures of the run kept beside its dataset)
SNAPSHOTS = {"default": (SNAPSHOT, REPO_ROOT / "config" / "config.yaml", ()),
             "decay-map": (DECAY_MAP, REPO_ROOT / "config" / "experiments" / "decay-map.yaml", ("decay-map.png",))}
README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"


def documents() -> list[Path]:
    """The files whose measured blocks are kept in step: the README and docs/*.md."""
    return [README, *sorted(DOCS.glob("*.md"))]
BIN = Path(sys.executable).parent
# NAME -> the command whose output the block shows (run in the repository root)
BLOCKS = {
    "science-check": [str(BIN / "qtraj"), "science-check", "--results-dir", str(SNAPSHOT)],
    "wsd-seed0": [str(BIN / "qtraj"), "query", "--results-dir", str(SNAPSHOT),
                  "SELECT step, any_value(phase) AS phase, round(any_value(loss_fp), 3) AS loss_fp, "
                  + ", ".join(f"round(100 * any_value(delta_q_loss) FILTER (quantization = '{name}'), 3) AS "
                              f"\"{name} %\"" for name in ("rtn-w3g32", "gptq-w3g32", "rtn-w4g32", "gptq-w4g32"))
                  + " FROM results WHERE run = 'wsd' GROUP BY step ORDER BY step"],
    "accuracy-drop": [str(BIN / "qtraj"), "query", "--results-dir", str(SNAPSHOT),
                      "SELECT quantization, round(100 * avg(mean_rel_drop), 2) AS mean_rel_drop_pct, "
                      "count(*) AS checkpoints FROM accuracy_summary GROUP BY ALL ORDER BY ALL"],
    "workflow-jobs": ["cat", str(SNAPSHOT / "workflow_jobs.txt")],
    "decay-map-science-check": [str(BIN / "qtraj"), "science-check", "--results-dir", str(DECAY_MAP)],
    "decay-map-cells": [str(BIN / "qtraj"), "science-check", "--cells", "--results-dir", str(DECAY_MAP)],
    "decay-map-jobs": ["cat", str(DECAY_MAP / "workflow_jobs.txt")],
    # each cell's training time (its runs and their constant-LR branches): the training loops' own clocks
    "decay-map-training": [str(BIN / "qtraj"), "query", "--results-dir", str(DECAY_MAP),
                           "SELECT regexp_extract(run, 'map-(m[0-9]+-tpp[0-9]+)', 1) AS cell, count(*) AS runs, "
                           "round(sum(seconds) / 60, 1) AS training_job_min FROM (SELECT run, max(elapsed_s) AS "
                           "seconds FROM training_log GROUP BY run) GROUP BY cell ORDER BY cell"],
    # computed from the config alone (the resource model the rules use), so it is rechecked exactly, not snapshot
    "paper-plan": [str(BIN / "qtraj"), "plan", "--configfile", str(REPO_ROOT / "config" / "paper.yaml")],
}
BLOCK = re.compile(r"(<!-- measured: (?P<name>[\w-]+) -->\n```\n)(?P<body>.*?)(```\n<!-- /measured -->)", re.S)


def default_config_hash(config_file: Path = SNAPSHOTS["default"][1]) -> str:
    """A validated config (defaults filled in), hashed: what a snapshot must have been run with."""
    sys.path.insert(0, str(REPO_ROOT / "src"))
    from qtraj.config import load_config
    from qtraj.provenance import config_hash

    return config_hash(load_config(config_file))


@functools.cache  # within one process the snapshot does not change (refresh clears it): each command runs once
def output_of(name: str) -> str:
    result = subprocess.run(BLOCKS[name], cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode not in (0, 1):  # science-check exits 1 only with --strict
        sys.exit(f"{' '.join(BLOCKS[name])} failed:\n{result.stderr}")
    return result.stdout.rstrip("\n") + "\n"


def refresh(results_dir: Path, name: str = "default") -> None:
    output_of.cache_clear()
    folder, config_file, figures = SNAPSHOTS[name]
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(results_dir / "dataset", folder / "dataset")
    for figure in figures:
        shutil.copy2(results_dir / "figures" / figure, folder / figure)
    bench = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "workflow_jobs.py"), str(results_dir)],
                           capture_output=True, text=True, check=True)
    (folder / "workflow_jobs.txt").write_text(bench.stdout)
    (folder / "config.json").write_text(json.dumps({"config_hash": default_config_hash(config_file)}, indent=1) + "\n")
    rewrite_blocks()


def rewrite_blocks() -> None:
    """Every block from its command on the snapshot (a command whose output changed, the snapshot unchanged)."""
    names = []
    for document in documents():
        text = document.read_text()
        names += [match.group("name") for match in BLOCK.finditer(text)]
        document.write_text(BLOCK.sub(lambda match: match.group(1) + output_of(match.group("name")) + match.group(4),
                                      text))
    print(f"blocks: {', '.join(names)}")


def problems() -> list[str]:
    """What is out of step, empty when nothing is."""
    found = []
    for name, (folder, config_file, _) in SNAPSHOTS.items():
        recorded = json.loads((folder / "config.json").read_text())["config_hash"]
        if recorded != default_config_hash(config_file):
            found.append(f"{folder.relative_to(REPO_ROOT)} is a run of another {config_file.relative_to(REPO_ROOT)}: "
                         f"rerun it, then `bench/measured.py refresh <its results_dir> --snapshot {name}`")
    names = set()
    for document in documents():
        for match in BLOCK.finditer(document.read_text()):
            names.add(match.group("name"))
            where = f"{document.name} block {match.group('name')!r}"
            if match.group("name") not in BLOCKS:
                found.append(f"{where} has no command in bench/measured.py")
            elif match.group("body") != output_of(match.group("name")):
                found.append(f"{where} differs from what its command prints")
    found += [f"no document has block {name!r}" for name in sorted(set(BLOCKS) - names)]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["refresh", "check", "blocks"])
    parser.add_argument("results_dir", nargs="?", default="results")
    parser.add_argument("--snapshot", choices=sorted(SNAPSHOTS), default="default",
                        help="which snapshot `refresh` replaces (default: the default run's)")
    args = parser.parse_args()
    if args.action == "refresh":
        refresh(Path(args.results_dir), args.snapshot)
    elif args.action == "blocks":
        rewrite_blocks()
    else:
        found = problems()
        print("\n".join(found) or "measured blocks are in step with the snapshot")
        sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
