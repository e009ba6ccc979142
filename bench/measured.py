"""The measured figures of README.md and docs/*.md, from commands: a snapshot of the default run and its blocks.

    .venv/bin/python bench/measured.py refresh [results_dir]   # after `make run`: snapshot, bench output, blocks
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
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = REPO_ROOT / "docs" / "measured" / "default"
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
    # computed from the config alone (the resource model the rules use), so it is rechecked exactly, not snapshot
    "paper-plan": [str(BIN / "qtraj"), "plan", "--configfile", str(REPO_ROOT / "config" / "paper.yaml")],
}
BLOCK = re.compile(r"(<!-- measured: (?P<name>[\w-]+) -->\n```\n)(?P<body>.*?)(```\n<!-- /measured -->)", re.S)


def default_config_hash() -> str:
    """The validated default config (defaults filled in), hashed: what the snapshot must have been run with."""
    sys.path.insert(0, str(REPO_ROOT / "src"))
    from qtraj.config import load_config
    from qtraj.provenance import config_hash

    return config_hash(load_config(REPO_ROOT / "config" / "config.yaml"))


def output_of(name: str) -> str:
    result = subprocess.run(BLOCKS[name], cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode not in (0, 1):  # science-check exits 1 only with --strict
        sys.exit(f"{' '.join(BLOCKS[name])} failed:\n{result.stderr}")
    return result.stdout.rstrip("\n") + "\n"


def refresh(results_dir: Path) -> None:
    if SNAPSHOT.exists():
        shutil.rmtree(SNAPSHOT)
    shutil.copytree(results_dir / "dataset", SNAPSHOT / "dataset")
    bench = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "workflow_jobs.py"), str(results_dir)],
                           capture_output=True, text=True, check=True)
    (SNAPSHOT / "workflow_jobs.txt").write_text(bench.stdout)
    (SNAPSHOT / "config.json").write_text(json.dumps({"config_hash": default_config_hash()}, indent=1) + "\n")
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
    recorded = json.loads((SNAPSHOT / "config.json").read_text())["config_hash"]
    if recorded != default_config_hash():
        found.append(f"{SNAPSHOT.relative_to(REPO_ROOT)} is a run of another default config: rerun `make run`, "
                     "then `bench/measured.py refresh`")
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
    args = parser.parse_args()
    if args.action == "refresh":
        refresh(Path(args.results_dir))
    elif args.action == "blocks":
        rewrite_blocks()
    else:
        found = problems()
        print("\n".join(found) or "measured blocks are in step with the snapshot")
        sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
