"""The fault drill: run the tiny test config, kill the workflow mid-job, rerun, corrupt one per-job result and one
dataset file, rerun, and compare with an undisturbed run of the same config; then evaluate two of its checkpoints
as a `local` trajectory, overwrite one's weights in place (its folder's modification time kept) and compare the
rerun with a run from scratch on the new weights.

    .venv/bin/python bench/fault_drill.py [workdir]

Prints what each disturbance cost (jobs rerun, files rewritten), how many results were lost (must be 0) and
whether the final rows equal the undisturbed run's (they must: every job is deterministic).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "2"]
COMPARED = ("run", "checkpoint", "quantization", "loss_fp", "loss_q", "delta_q_loss")


def write_config(workdir: Path, name: str) -> Path:
    config = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    config["corpus"]["path"] = str(REPO / "data" / "corpus" / "sotu.jsonl.xz")
    config["results_dir"] = str(workdir / name)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(workdir: Path, config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*SNAKEMAKE, "--directory", str(workdir), "--configfile", str(config), *args],
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        sys.exit(f"snakemake failed:\n{result.stderr[-3000:]}")
    return result


def jobs_run(result: subprocess.CompletedProcess) -> int:
    """Jobs a finished run executed (Snakemake logs 'Finished jobid' once per job)."""
    return (result.stdout + result.stderr).count("Finished jobid")


def per_job_files(results_dir: Path) -> dict[str, tuple[int, str]]:
    """Every per-job result -> (modification time, content hash): a file recomputed or lost shows as a change."""
    import hashlib

    return {str(path.relative_to(results_dir)): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            for path in (results_dir / "evals").rglob("*.parquet")}


def compare(before: dict, after: dict) -> tuple[int, int, int]:
    """(files lost, files rewritten, files kept untouched) among those in `before`.

    A rewritten file is not a lost result: a job with several outputs (the fp evaluation writes loss, accuracy and
    sharpness) reruns whole when the kill left only some of them, and writes the same bytes again."""
    lost = sum(1 for name in before if name not in after)
    rewritten = sum(1 for name, facts in before.items() if name in after and after[name] != facts)
    return lost, rewritten, len(before) - lost - rewritten


def rows(results_dir: Path) -> list[tuple]:
    table = pq.read_table(results_dir / "dataset" / "results.parquet", columns=list(COMPARED))
    return sorted(tuple(row.values()) for row in table.to_pylist())


def kill_mid_job(workdir: Path, config: Path, after_files: int) -> None:
    """Start the workflow and SIGKILL its whole process group once `after_files` per-job results exist."""
    process = subprocess.Popen([*SNAKEMAKE, "--directory", str(workdir), "--configfile", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    results_dir = Path(yaml.safe_load(config.read_text())["results_dir"])
    while process.poll() is None and len(per_job_files(results_dir)) < after_files:
        time.sleep(0.5)
    if process.poll() is not None:
        sys.exit("the workflow ended before the drill could kill it; raise the number of jobs it waits for")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def local_config(workdir: Path, name: str, checkpoints: Path) -> Path:
    """The tiny config's data, quantizations and tasks, over the checkpoint folders in `checkpoints` (read in place)."""
    config = yaml.safe_load(write_config(workdir, name).read_text())
    for key in ("runs", "cooldowns", "averages", "training", "model", "tokenizer"):
        config.pop(key, None)
    config["local"] = {"mine": {"path": str(checkpoints), "pattern": "step{step}"}}
    # micro models read back as a local trajectory: far from a pretrained model's loss (qtraj.sanity)
    config["evaluation"] = {**config.get("evaluation", {}), "max_loss_fraction": None}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def overwrite_in_place(root: Path, trained: Path) -> bool:
    """Returns whether the rerun after an in-place overwrite equals a run from scratch on the new weights."""
    import shutil

    checkpoints = root / "local-checkpoints"
    for step in ("step000020", "step000040"):
        shutil.copytree(trained / "wsd" / step, checkpoints / step, symlinks=False)
        (checkpoints / step / ".qtraj-folder.json").unlink(missing_ok=True)
    config = local_config(root, "local", checkpoints)
    jobs = jobs_run(run(root, config))
    before = per_job_files(root / "local")
    target = checkpoints / "step000040"
    times = target.stat()
    shutil.copyfile(trained / "cosine" / "step000040" / "model.safetensors", target / "model.safetensors")
    os.utime(target, ns=(times.st_atime_ns, times.st_mtime_ns))
    rerun = run(root, config)
    after = per_job_files(root / "local")
    remeasured = sorted({re.search(r"step\d+", name).group() for name in after if after[name] != before.get(name)})
    fresh = run(root, local_config(root, "local-fresh", checkpoints))
    same = rows(root / "local") == rows(root / "local-fresh")
    print(f"local trajectory of 2 checkpoints ({jobs} jobs): overwrote step000040/model.safetensors in place (folder "
          f"time kept); the rerun ran {jobs_run(rerun)} jobs, re-measured checkpoints {remeasured}; rows equal to a "
          f"run from scratch on the new weights ({jobs_run(fresh)} jobs): {same}")
    return same and remeasured == ["step000040"]


def main(workdir: str | None = None) -> None:
    root = Path(workdir or tempfile.mkdtemp(prefix="qtraj-fault-drill-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    reference_config = write_config(root, "undisturbed")
    jobs = jobs_run(run(root, reference_config))
    reference = rows(root / "undisturbed")
    print(f"undisturbed run: {jobs} jobs, {len(reference)} result rows ({time.perf_counter() - started:.0f} s)")

    config = write_config(root, "disturbed")
    results_dir = root / "disturbed"
    kill_mid_job(root, config, after_files=10)
    survived = per_job_files(results_dir)
    run(root, config, "--unlock")
    rerun = run(root, config, "--rerun-incomplete")
    lost_after_kill, rewritten, _ = compare(survived, per_job_files(results_dir))
    print(f"killed (SIGKILL to the process group) with {len(survived)} per-job files written; the rerun ran "
          f"{jobs_run(rerun)} jobs; of the files written before the kill: lost {lost_after_kill}, "
          f"rewritten by a rerun of a job with several outputs {rewritten}")

    job_file = sorted((results_dir / "evals" / "quantized").rglob("*.parquet"))[0]
    job_file.write_bytes(job_file.read_bytes()[:100])
    refused = run(root, config, check=False)
    named = refused.returncode != 0 and str(job_file) in refused.stdout + refused.stderr
    print(f"truncated {job_file.relative_to(results_dir)}: the workflow stopped before any job "
          f"(exit {refused.returncode}) naming it: {named}")
    job_file.unlink()
    dataset_file = results_dir / "dataset" / "layer_errors.parquet"
    dataset_file.write_bytes(b"garbage")
    before = per_job_files(results_dir)
    repaired = run(root, config)
    after = per_job_files(results_dir)
    lost, rewritten, unchanged = compare(before, after)
    restored = str(job_file.relative_to(results_dir)) in after
    print(f"deleted it and overwrote {dataset_file.relative_to(results_dir)}: the rerun ran {jobs_run(repaired)} "
          f"jobs and rebuilt the deleted file: {restored}; other per-job results lost: {lost}, "
          f"rewritten {rewritten}, kept untouched {unchanged}")

    final = rows(results_dir)
    same = final == reference
    print(f"final results: {len(final)} rows, equal to the undisturbed run's: {same}")
    overwritten_right = overwrite_in_place(root, root / "undisturbed" / "checkpoints")
    print(f"drill took {time.perf_counter() - started:.0f} s in {root}")
    sys.exit(0 if same and named and restored and lost == 0 and lost_after_kill == 0 and overwritten_right else 1)


if __name__ == "__main__":
    main(*sys.argv[1:])
