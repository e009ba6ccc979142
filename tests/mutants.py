"""Mutation testing of qtraj's core: named one-line mutations, each applied alone to a copy of the repository, and the
tests that should catch it run there. A mutation whose tests still pass is a survivor: a way qtraj could print a
wrong number (or lose data) with those tests green.

    make mutants                       # all of them (12-25 min on 2 cores); not part of `make test`
    python tests/mutants.py --list     # names, places, tests
    python tests/mutants.py aggregate-unsorted corpus-split-by-python-hash

The working tree is never touched: it is copied once to a temporary folder (without .venv, results*, .snakemake,
logs), every mutation is written there and undone after its run, and the copy's code is what the tests import
(PYTHONPATH; checked before anything runs). First the named tests run on the unmutated copy: a mutation can only be
"caught" by tests that pass without it. A mutation whose text is no longer in its file (the code moved or changed)
is reported as "not applicable", so the list is kept in step with the code. Survivors that are understood say why
(`survives`); docs/tests.md lists them. Exit status 1 when a mutation survives unexplained, is no longer
applicable, or its tests cannot run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# top-level entries of the working tree that are no part of the code under test (or are rebuilt by tests)
NOT_COPIED = {".venv", ".git", ".snakemake", "logs", ".pytest_cache", ".ruff_cache"}


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # exact text, found exactly once in the file (it may span lines to be unique; one line changes)
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the repository root
    means: str  # what the mutation would do to qtraj's numbers or data
    survives: str | None = None  # why a survivor is expected and acceptable (None: it must be caught)


M = "tests/test_methods.py"
RQ = "tests/test_results_and_query.py"
MUTANTS = (
    # --- methods ---------------------------------------------------------------------------------------------------
    Mutant("llmcompressor-group-size-doubled", "src/qtraj/methods/_llmcompressor.py",
           'weights.update(strategy="group", group_size=spec.group_size)',
           'weights.update(strategy="group", group_size=spec.group_size * 2)',
           (f"{M}::test_rtn_equals_a_hand_written_round_to_nearest_bit_for_bit",),
           "every grouped result measured at twice the configured group size"),
    Mutant("llmcompressor-always-symmetric", "src/qtraj/methods/_llmcompressor.py",
           '"symmetric": spec.symmetric}', '"symmetric": True}',
           (f"{M}::test_rtn_equals_a_hand_written_round_to_nearest_bit_for_bit",),
           "asymmetric quantizations silently symmetric"),
    Mutant("output-head-quantized", "src/qtraj/methods/base.py",
           "if module is head or isinstance(module, torch.nn.Embedding) or _is_router(module):",
           "if isinstance(module, torch.nn.Embedding) or _is_router(module):",
           (f"{M}::test_weights_sit_on_a_grid_of_2_to_the_bits_levels_per_group",),
           "the output head quantized too, unlike every engine and the paper"),
    Mutant("llmcompressor-shuffled-calibration", "src/qtraj/methods/_llmcompressor.py",
           "shuffle_calibration_samples=False,", "shuffle_calibration_samples=True,",
           (f"{M}::test_gptq_beats_rtn_at_3_bits_and_fewer_bits_hurt_more",
            f"{M}::test_gptq_reconstruction_error_is_at_most_rtn_on_every_layer"),
           "calibration blocks in an order drawn from torch's global generator",
           survives="equivalent in effect: the order changes only the float rounding of GPTQ's Hessian (a sum over "
                    "the calibration tokens) and of AWQ's means, and rounding to the grid absorbs it: with shuffling "
                    "on, GPTQ after two different global seeds gave bit-identical weights on the tiny model"),
    # --- the quantize job --------------------------------------------------------------------------------------------
    Mutant("quantized-loss-on-calibration-tokens", "src/qtraj/steps.py",
           "    started = time.perf_counter()\n"
           "    loss = _validation_loss(model, validation_tokens, evaluation, what, bos_id)\n",
           "    started = time.perf_counter()\n"
           "    loss = _validation_loss(model, calibration_tokens, evaluation, what, bos_id)\n",
           ("tests/test_quantize_job.py",),
           "ΔQ L compares the fp loss on validation text with the quantized loss on calibration text"),
    Mutant("quantized-row-loss-fp-not-the-fp-row", "src/qtraj/steps.py",
           '"loss_fp": fp_row["loss_fp"], "loss_q": loss.loss,', '"loss_fp": loss.loss, "loss_q": loss.loss,',
           ("tests/test_quantize_job.py",),
           "results.loss_fp no longer the checkpoint's fp_evals.loss_fp"),
    # --- evaluation --------------------------------------------------------------------------------------------------
    Mutant("loss-counts-input-positions", "src/qtraj/evaluation.py",
           "count += batch[:, 1:].numel()", "count += batch.numel()",
           ("tests/test_training_and_evaluation.py::test_loss_does_not_depend_on_batch_size",),
           "every loss divided by one token too many per block"),
    Mutant("loss-scores-the-inputs", "src/qtraj/evaluation.py",
           "targets = batch[:, 1:].reshape(-1)", "targets = batch[:, :-1].reshape(-1)",
           ("tests/test_training_and_evaluation.py::test_loss_does_not_depend_on_batch_size",),
           "each position scored against its own input token, not the next one"),
    Mutant("load-ignores-missing-weights", "src/qtraj/evaluation.py",
           'for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):', 'for kind in ("mismatched_keys",):',
           (f"{M}::test_a_folder_missing_weights_or_holding_extra_ones_is_refused_naming_them",),
           "a checkpoint missing a tensor evaluated with random values in its place"),
    # --- layer errors ------------------------------------------------------------------------------------------------
    Mutant("layer-error-keeps-the-bias", "src/qtraj/layer_errors.py",
           "output = output - quantized_layer.bias.detach().float().cpu()", "output = output",
           (f"{M}::test_layer_errors_of_a_biased_layer_compare_its_weights_only",),
           "reconstruction errors of biased layers (GPT-2, OLMo-1, Qwen's q/k/v) include the bias"),
    Mutant("layer-error-relative-to-the-weight", "src/qtraj/layer_errors.py",
           "recon_error_rel=recon / max(torch.linalg.norm(reference).item(), 1e-30)",
           "recon_error_rel=recon / max(torch.linalg.norm(weight).item(), 1e-30)",
           (f"{M}::test_layer_errors_match_a_hand_computed_layer",
            f"{M}::test_layer_errors_of_a_biased_layer_compare_its_weights_only"),
           "recon_error_rel divided by the weight's norm instead of the output's"),
    # --- results -----------------------------------------------------------------------------------------------------
    Mutant("result-written-in-place", "src/qtraj/results.py",
           "    temporary = _write_beside(table, Path(path))\n    os.replace(temporary, path)\n",
           "    pq.write_table(table, path); return  # noqa\n    os.replace(temporary, path)\n",
           (f"{RQ}::test_a_write_killed_midway_leaves_the_old_file_whole_and_no_temporary",),
           "a job killed mid-write leaves a truncated result file"),
    Mutant("aggregate-unsorted", "src/qtraj/results.py",
           'table = table.sort_by([(key, "ascending") for key in spec.sort_keys])', "table = table",
           (f"{RQ}::test_the_aggregate_sorts_every_table_by_its_keys",),
           "the dataset's row order depends on file names and write order"),
    Mutant("delta-q-loss-a-ratio", "src/qtraj/results.py",
           "return loss_q / loss_fp - 1.0", "return loss_q / loss_fp",
           (RQ,), "ΔQ L off by one"),
    Mutant("aggregate-accepts-nan", "src/qtraj/results.py",
           "if value is None or not math.isfinite(value):", "if value is None:",
           (f"{RQ}::test_aggregate_refuses_non_finite_results",),
           "a NaN loss enters the dataset and every mean over it"),
    # --- query -------------------------------------------------------------------------------------------------------
    Mutant("query-filter-blind-to-explain", "src/qtraj/query.py",
           "if statement.type != duckdb.StatementType.EXPLAIN:", "if True:",
           (f"{RQ}::test_the_statement_filter_looks_through_explain",),
           "EXPLAIN ANALYZE of a write passes the filter (the read-only connection still refuses it)"),
    Mutant("query-allows-create", "src/qtraj/query.py",
           "    duckdb.StatementType.PRAGMA,\n}", "    duckdb.StatementType.PRAGMA, duckdb.StatementType.CREATE,\n}",
           (f"{RQ}::test_query_is_read_only",), "CREATE passes the filter"),
    Mutant("query-reads-other-files", "src/qtraj/query.py",
           '"enable_external_access": False', '"enable_external_access": True',
           (f"{RQ}::test_query_cannot_read_other_files",), "a query can read any file the user can"),
    # --- corpus ------------------------------------------------------------------------------------------------------
    Mutant("corpus-split-by-python-hash", "src/qtraj/corpus.py",
           'digest = hashlib.sha256(document_key(document).encode("utf-8")).digest()',
           'digest = hash(document_key(document)).to_bytes(8, "big", signed=True)',
           ("tests/test_corpus.py",), "splits differ between processes and machines"),
    Mutant("corpus-calibration-overlaps-validation", "src/qtraj/corpus.py",
           "if bucket < validation_fraction + calibration_fraction:", "if bucket < calibration_fraction:",
           ("tests/test_corpus.py",), "calibration documents drawn from the validation bucket range"),
    Mutant("corpus-key-ignores-metadata", "src/qtraj/corpus.py",
           'if "year" in document and "president" in document:', "if False:",
           ("tests/test_corpus.py",), "a document's split follows its text, so an edited text moves it"),
    # --- science check -----------------------------------------------------------------------------------------------
    Mutant("science-t-with-n-degrees-of-freedom", "src/qtraj/science.py",
           "return t_critical(self.n - 1) * stdev", "return t_critical(self.n) * stdev",
           ("tests/test_science.py",), "confidence intervals too narrow"),
    Mutant("science-verdict-ignores-direction", "src/qtraj/science.py",
           "return SUPPORTED if (mean > 0) == (expected > 0) else OPPOSITE", "return SUPPORTED",
           ("tests/test_science.py",), "an effect against the paper's direction reported as supported"),
    # --- sharpness ---------------------------------------------------------------------------------------------------
    Mutant("sharpness-smallest-ritz-value", "src/qtraj/sharpness.py",
           "theta, residual = float(ritz_values[-1]),", "theta, residual = float(ritz_values[0]),",
           ("tests/test_sharpness.py",), "sharpness reports the smallest Ritz value"),
    Mutant("sharpness-unnormalised-start", "src/qtraj/sharpness.py",
           "start = [v / norm for v in start]", "start = [v * 1.0 for v in start]",
           ("tests/test_sharpness.py",), "Lanczos from a start vector that is not of unit length"),
    # --- local checkpoint folders ------------------------------------------------------------------------------------
    Mutant("local-folder-runs-its-own-code", "src/qtraj/sources/folder.py",
           'if "auto_map" in json.loads((source / "config.json").read_text()):', "if False:",
           ("tests/test_local.py::test_a_folder_whose_config_asks_for_its_own_code_is_refused_and_nothing_is_linked",),
           "a local folder whose config maps to its own code is linked (the loader refuses it later)"),
    Mutant("local-folder-follows-links-out", "src/qtraj/sources/folder.py",
           "if target is not None and not allow_external_links:", "if False:",
           ("tests/test_faults.py::test_a_weights_link_out_of_the_checkpoint_folder_is_refused_naming_it",),
           "a stray link passes for a checkpoint's weights"),
    Mutant("local-folder-links-trainer-state", "src/qtraj/sources/folder.py",
           'NOT_LINKED = ("qtraj_*", "trainer_state.json", ', 'NOT_LINKED = ("qtraj_*", ',
           ("tests/test_local.py::test_linking_reads_in_place_and_brings_no_code_or_training_state",),
           "the HF Trainer's state is linked into the checkpoint folder"),
    # --- hub ---------------------------------------------------------------------------------------------------------
    Mutant("hub-unpinned-remote-code", "src/qtraj/hub.py",
           'if family["trust_remote_code"] and revision.commit is None:', "if False:",
           ("tests/test_hub.py::test_remote_code_runs_only_from_a_pinned_commit",),
           "remote code of an unpinned branch runs"),
    Mutant("hub-pickle-without-consent", "src/qtraj/hub.py",
           'if not family["allow_pickle"] and not any(item.suffix', "if False and not any(item.suffix",
           ("tests/test_hub.py::test_pickle_only_weights_are_refused_unless_the_family_allows_them",),
           "a pickle-only revision is taken without the family allowing it"),
    # --- the workflow's Slurm profile check (Snakefile onstart) ----------------------------------------------------
    Mutant("slurm-profile-unchecked", "Snakefile",
           "if unset := unexpanded_profile_variables(workflow.resource_settings.default_resources, os.environ):",
           "if unset := []:",
           ("tests/test_slurm.py::test_the_profile_submits_nothing_with_its_variables_unset",),
           'sbatch asked for a partition literally named "$QTRAJ_SLURM_PARTITION"'),
)


def copy_tree(destination: Path) -> None:
    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder).resolve() == ROOT
        return {name for name in names if name in ("__pycache__", ".pytest_cache")
                or (top and (name in NOT_COPIED or name.startswith("results")))}

    shutil.copytree(ROOT, destination, symlinks=True, ignore=ignore)


def environment(copy: Path) -> dict[str, str]:
    # the copy's code first; no bytecode written, so a restored file is never run from a mutant's cached bytecode
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy / "src"), str(copy)]),
            "PYTHONDONTWRITEBYTECODE": "1"}


def check_imports_the_copy(copy: Path) -> None:
    found = subprocess.run([sys.executable, "-c", "import qtraj; print(qtraj.__file__)"], cwd=copy,
                           env=environment(copy), capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"the copy imports qtraj from {found}, not from {copy}: refusing to run")


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """(outcome, seconds, what to show): outcome "passed", "failed", "error" (pytest could not run them) or
    "timeout"; the first failing test's summary line, else pytest's last lines."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=copy, env=environment(copy), capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - started, ""
    lines = (result.stdout + result.stderr).strip().splitlines()
    outcome = {0: "passed", 1: "failed", 2: "failed"}.get(result.returncode, "error")  # 2: collection failed
    failures = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return outcome, time.perf_counter() - started, (failures[0] if failures else "\n".join(lines[-3:]))


def apply(copy: Path, mutant: Mutant) -> str | None:
    """Write the mutation into the copy; the original text, or None when the mutation no longer applies."""
    path = copy / mutant.path
    if not path.is_file():
        return None
    original = path.read_text()
    if original.count(mutant.old) != 1:
        return None
    path.write_text(original.replace(mutant.old, mutant.new))
    return original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the tests on the unmutated copy")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation (default 900)")
    parser.add_argument("--keep", action="store_true", help="keep the copy (its path is printed)")
    args = parser.parse_args(argv)
    by_name = {mutant.name: mutant for mutant in MUTANTS}
    unknown = [name for name in args.names if name not in by_name]
    if unknown:
        parser.error(f"no mutation {', '.join(unknown)}; --list names them")
    chosen = [by_name[name] for name in args.names] or list(MUTANTS)
    if args.list:
        for mutant in chosen:
            path = ROOT / mutant.path
            applies = path.is_file() and path.read_text().count(mutant.old) == 1
            print(f"{mutant.name}{'' if applies else '  [NOT APPLICABLE: text not found once]'}\n"
                  f"    {mutant.path}: {mutant.old.strip()!r} -> {mutant.new.strip()!r}\n"
                  f"    means: {mutant.means}\n    tests: {' '.join(mutant.tests)}"
                  + (f"\n    expected to survive: {mutant.survives}" if mutant.survives else ""))
        return 0

    copy = Path(tempfile.mkdtemp(prefix="qtraj-mutants-")) / "repo"
    try:
        copy_tree(copy)
        check_imports_the_copy(copy)
        print(f"copy of {ROOT} in {copy}; {len(chosen)} mutations", flush=True)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(test for mutant in chosen for test in mutant.tests))
            outcome, seconds, tail = run_tests(copy, tests, args.timeout * 2)
            print(f"baseline (no mutation): {outcome} in {seconds:.0f} s", flush=True)
            if outcome != "passed":
                print(tail)
                print("the tests fail without any mutation: fix them first (or run with --no-baseline)")
                return 1
        rows, bad = [], 0
        for mutant in chosen:
            original = apply(copy, mutant)
            if original is None:
                rows.append((mutant, "NOT APPLICABLE", 0.0, "its text is not (exactly once) in the file"))
                bad += 1
            else:
                try:
                    outcome, seconds, tail = run_tests(copy, mutant.tests, args.timeout)
                finally:
                    (copy / mutant.path).write_text(original)
                verdict = {"failed": "caught", "timeout": "caught (timeout)", "passed": "SURVIVED",
                           "error": "ERROR"}[outcome]
                if outcome == "passed" and mutant.survives:
                    verdict, tail = "survived (expected)", mutant.survives
                elif outcome in ("passed", "error"):
                    bad += 1
                rows.append((mutant, verdict, seconds, tail))
            print(f"{rows[-1][1]:>20}  {mutant.name}  ({rows[-1][2]:.0f} s)"
                  + (f"\n{'':>22}{tail[:150]}" if verdict.startswith("caught") else ""), flush=True)
        caught = sum(verdict.startswith("caught") for _, verdict, _, _ in rows)
        print(f"\n{caught} of {len(rows)} caught")
        for mutant, verdict, _, note in rows:
            if not verdict.startswith("caught"):
                print(f"{verdict}: {mutant.name} ({mutant.path}): {mutant.means}\n    {note}")
        return 1 if bad else 0
    finally:
        if args.keep:
            print(f"kept: {copy}")
        else:
            shutil.rmtree(copy.parent, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
