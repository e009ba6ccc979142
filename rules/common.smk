# Config validation, look-ups and target builders. Every rule file after this one holds only rules.
import os
import re
import sys

from snakemake.exceptions import WorkflowError

from qtraj.config import (
    data_settings,
    data_source,
    is_external,
    quant_spec,
    read_yaml,
    summary_figures,
    training_params,
    trajectories,
    validate_config,
    validation_text,
)
from qtraj.checkpoints import checkpoint_name
from qtraj.corpus import MEASURED_SPLITS, SPLITS
from qtraj.jobs import JOB_KINDS, RESOURCE_KEYS
from qtraj.plan import per_job_paths, planned_jobs, step_resources
from qtraj.results import DATASET_MANIFEST, TABLES, dataset_file
from qtraj.sources import source_of, sources
from qtraj.sources.averages import averaging_plan_of
from qtraj.sources.trained import branch_steps, checkpoint_steps

# Snakemake reads --configfile itself and keeps the last of duplicate keys; read each again, strictly.
for configfile_path in workflow.configfiles:
    read_yaml(configfile_path)
validate_config(config)

RESULTS = config["results_dir"]
LOGS = f"{RESULTS}/logs"
SOURCES = sources(config)  # one per kind of trajectory (qtraj.sources), in trajectory order
TRAJECTORIES = trajectories(config)
QUANTIZATIONS = list(config["quantizations"])
PLANNED_JOBS = planned_jobs(config)  # the sized jobs (qtraj.plan): their per-job files are the durable record


def alternatives(names):
    """A regex matching exactly these names (slugs may hold dots); one that matches nothing if there are none."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


SOURCE_NAMES = {source.key: source.names() for source in SOURCES}  # config key -> its trajectories


def trajectories_of(key):
    """A wildcard constraint: the trajectories of the source with config key `key` (qtraj.sources)."""
    return alternatives(SOURCE_NAMES[key])


def source_rule_files():
    """Each source's rules file (a name in rules/, or a plugin's path), once, in trajectory order."""
    files = [
        source.rules if os.path.isabs(source.rules) else f"rules/{source.rules}" for source in SOURCES if source.rules
    ]
    return list(dict.fromkeys(files))


# the trajectories whose checkpoints are folders on disk: rules/local.smk links them (qtraj.sources.folder)
FOLDER_PATTERN = alternatives(name for source in SOURCES if source.links_folders for name in source.names())


wildcard_constraints:
    run=alternatives(TRAJECTORIES),
    checkpoint=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    quantization=alternatives(QUANTIZATIONS),
    split="|".join(SPLITS),


def kind_outputs(kind, **fixed):
    """Output name -> per-job file of a job of `kind` (qtraj.jobs.JOB_KINDS); `fixed`: wildcards the rule fixes
    (a training rule's run)."""
    return {
        name: f"{RESULTS}/{pattern}".format(**fixed) if fixed else f"{RESULTS}/{pattern}"
        for name, pattern in JOB_KINDS[kind].output_patterns().items()
    }


def kind_log(kind, **fixed):
    """The log of a job of `kind` (qtraj.jobs.JOB_KINDS), where `qtraj status` looks for it."""
    pattern = f"{RESULTS}/{JOB_KINDS[kind].log_pattern()}"
    return pattern.format(**fixed) if fixed else pattern


def kind_resources(kind, run=None):
    """The `resources:` of the job kind `kind`, what `qtraj plan` reports for its jobs (qtraj.plan); `run` for the
    rules without a run wildcard."""
    return {key: resource(JOB_KINDS[kind].step, key, run) for key in RESOURCE_KEYS}


def tokens_file(split):
    """Input function: the token file of `split` for a trajectory (the carried corpus's, or its family's)."""

    def path(wildcards):
        source = data_source(config, wildcards.run)
        if is_external(config, source):  # tokenized with its own tokenizer
            return f"{RESULTS}/data/tokens/{source}/{split}.npy"
        return f"{RESULTS}/data/tokens/{split}.npy"

    return path


def task_files(wildcards):
    """Input function: task name -> data file of the trajectory's local accuracy tasks (built from its validation
    text; none when the config lists no local tasks)."""
    text = validation_text(config, wildcards.run)
    local_tasks = data_settings(config, wildcards.run)["accuracy"]["local_tasks"]
    return {name: f"{RESULTS}/data/tasks/{text}/{name}.jsonl" for name in local_tasks}


def lm_eval_marker(wildcards):
    """Input function: the marker of the registered lm-eval tasks a trajectory is scored on (none: no input)."""
    if not data_settings(config, wildcards.run)["accuracy"]["lm_eval_tasks"]:
        return []
    return [f"{RESULTS}/data/tasks/{validation_text(config, wildcards.run)}/lm_eval.json"]


def validation_text_file(text):
    """The validation documents a local task of `text` (corpus | hub) is built from."""
    if text == "hub":
        return f"{RESULTS}/data/hub/validation.jsonl"
    return f"{RESULTS}/data/splits/validation.jsonl"


def local_task_settings(wildcards):
    source = config["hub_data"] if wildcards.text == "hub" else config
    return source["accuracy"]["local_tasks"][wildcards.task]


def tokens_per_char_limit(wildcards):
    """Params function: the most tokens per character an external model's tokenizer may cut its validation text
    into (qtraj.sanity; null in the evaluation settings turns the check off)."""
    from qtraj.sanity import limit

    return limit(data_settings(config, wildcards.run)["evaluation"], "max_tokens_per_char")


def data_setting(kind):
    """Params function: the `calibration` or `evaluation` settings of a trajectory."""
    return lambda wildcards: data_settings(config, wildcards.run)[kind]


def resource(step, key, run=None):
    """Resource function: `key` of what a `step` job on this trajectory's model asks a cluster for
    (qtraj.resources; micro models trained here ask for no GPU). `run`: for rules without a run wildcard."""

    def value(wildcards):
        # the same sizing `qtraj plan` reports (qtraj.plan.step_resources), once per (step, trajectory): every job
        # asks for each of RESOURCE_KEYS, and sizing a local folder reads its safetensors headers and config.json
        name = run or wildcards.run
        if (step, name) not in SIZED:
            SIZED[step, name] = step_resources(config, step, name)
        return SIZED[step, name].get(key, 0)

    return value


# (step, trajectory) -> its step_resources: the config does not change while Snakemake plans
SIZED = {}


def averaged_sources(wildcards):
    """Input function: the checkpoint folders an averaged checkpoint is made of."""
    ingredients, _ = averaging_plan_of(config, wildcards.run)[wildcards.checkpoint]
    return [f"{RESULTS}/checkpoints/{run}/{checkpoint}" for run, checkpoint in ingredients]


def averaged_weights(wildcards):
    return averaging_plan_of(config, wildcards.run)[wildcards.checkpoint][1]


def downloaded_checkpoint(path):
    """A hub checkpoint folder: temp() unless hub_data.keep_checkpoints (see the schema for the trade-off)."""
    folder = directory(path)
    return folder if config["hub_data"]["keep_checkpoints"] else temp(folder)


def family_download(wildcards):
    """Params function: what one revision's download job needs (qtraj.sources.families)."""
    return source_of(config, wildcards.run).download_params(wildcards.run, wildcards.checkpoint)


def family_tokenizer(wildcards):
    """Params function: where a family's tokenizer comes from (qtraj.sources.families)."""
    return source_of(config, wildcards.run).tokenizer_params(wildcards.run)


def training_settings(run):
    """A run's merged training settings plus its model: the params of its training job (qtraj.config)."""
    return training_params(config, run)


def folder_checkpoint(wildcards):
    """Input function: the folder on disk a checkpoint of a folder source is read from (qtraj.sources.folder)."""
    return source_of(config, wildcards.run).checkpoint_folder(wildcards.run, wildcards.checkpoint)


def folder_checkpoint_facts(wildcards):
    """Params function: what the link job records about a checkpoint (its step, tokens, LR, phase; the folder's
    path is filled in by the job, so moving the data never reruns anything)."""
    return source_of(config, wildcards.run).checkpoint_facts(wildcards.run, wildcards.checkpoint)


def folder_link_setting(key):
    """Params function: `allow_pickle` or `allow_external_links` of a folder source's trajectory."""
    return lambda wildcards: source_of(config, wildcards.run).link_settings(wildcards.run)[key]


def fingerprint_cache():
    """Where digests are kept: in the results folder once qtraj owns it (a dry run writes nothing)."""
    from qtraj.fingerprint import CACHE_FILE
    from qtraj.ownership import RESULTS_MARKER

    owned = os.path.isfile(f"{RESULTS}/{RESULTS_MARKER}")
    return f"{RESULTS}/{CACHE_FILE}" if owned else None


def folder_fingerprint(wildcards):
    """Params function: the content of the files a checkpoint folder contributes (qtraj.fingerprint), so that
    weights overwritten in place rerun exactly this checkpoint's jobs. None for a folder a rule of this workflow
    makes (a converted GGUF model: its own job reruns on a change) or one not there yet."""
    from qtraj.fingerprint import fingerprint

    source = source_of(config, wildcards.run)
    folder = source.checkpoint_folder(wildcards.run, wildcards.checkpoint)
    made_here = {os.path.abspath(path) for other in SOURCES for path in other.made_folders()}
    if os.path.abspath(folder) in made_here:
        return None
    files = source.linked_files(wildcards.run, wildcards.checkpoint)  # a link out is refused by the job, not read
    return None if files is None else fingerprint(files, fingerprint_cache())


def gguf_file_fingerprint(wildcards):
    """Params function: the content of a GGUF model's `file:` (a pinned package version needs none), so that a
    replaced file is converted again."""
    from qtraj.fingerprint import fingerprint

    path = config["gguf_models"][wildcards.model]["file"]
    return fingerprint([path], fingerprint_cache()) if path and os.path.isfile(path) else None


def folder_tokenizer(wildcards):
    """Input function: the `tokenizer` folder a folder source's entry names (none: the job takes the first selected
    checkpoint's own, so that selecting other checkpoints never reruns the trajectory)."""
    return source_of(config, wildcards.run).tokenizer_input(wildcards.run)


def checkpoint_dirs(run):
    """step -> checkpoint folder for every checkpoint the run saves."""
    return {step: f"{RESULTS}/checkpoints/{run}/{checkpoint_name(step)}" for step in checkpoint_steps(config, run)}


def cooldown_parent(wildcards):
    """Input function: the checkpoint folder (with training state) a cooldown branch resumes
    (qtraj.sources.cooldowns)."""
    run, checkpoint = source_of(config, wildcards.run).parent_checkpoint(wildcards.run, wildcards.checkpoint)
    return f"{RESULTS}/checkpoints/{run}/{checkpoint}"


def cooldown_settings(wildcards):
    """Params function: the training settings of the run a cooldown branch resumes (its job's `settings`)."""
    return training_settings(source_of(config, wildcards.run).parent(wildcards.run))


def cooldown_entry(wildcards):
    """Params function: a cooldown's config entry (where it branches, how long, which shape)."""
    return source_of(config, wildcards.run).entry(wildcards.run)


def per_job_files(table):
    """Every per-job file of result table `table` this config makes (the planned jobs' outputs): the aggregate's
    inputs and, all together, the workflow's durable targets."""
    return [f"{RESULTS}/{path}" for path in per_job_paths(PLANNED_JOBS, table)]


def packed_model_output():
    """The quantize rule's extra output when the config keeps packed models (an empty dict otherwise)."""
    if not config["packed_models"]:
        return {}
    return {"packed": directory(f"{RESULTS}/packed/{{run}}/{{checkpoint}}/{{quantization}}")}


def dataset_tables():
    return [f"{RESULTS}/{dataset_file(table)}" for table in TABLES]


def dataset_manifest():
    """The aggregate's output and what reads the dataset depends on (qtraj.results.DATASET_MANIFEST): the tables
    themselves are swapped in by the aggregate, never deleted by Snakemake before it runs."""
    return f"{RESULTS}/{DATASET_MANIFEST}"


def per_job_results():
    """Every per-job Parquet file of the config: the durable record. Named as targets so that a missing one is
    rebuilt whatever Snakemake's metadata says (a copied results directory, a lost .snakemake/, a deleted file);
    otherwise a dataset newer than its inputs would hide the gap."""
    return [path for table in TABLES for path in per_job_files(table)]


def check_results_readable():
    """Before any job (in the main process only: cluster jobs re-read this file): an unreadable dataset file, derived
    from the per-job files, is moved aside so that the aggregate rebuilds it; an unreadable per-job result stops the
    workflow naming it and the fix, so that nothing computed is deleted behind the user's back and no figure is
    redrawn from a broken dataset."""
    from qtraj.results import unreadable_parquet_files

    if not workflow.is_main_process:
        return
    for path in unreadable_parquet_files(dataset_tables()):
        os.replace(path, f"{path}.unreadable")
        print(
            f"qtraj: {path} is unreadable; moved to {path}.unreadable, the aggregate rebuilds it",
            file=sys.stderr,
        )
    if os.path.exists(dataset_manifest()) and not all(map(os.path.exists, dataset_tables())):
        os.remove(dataset_manifest())  # a table is missing: the aggregate (whose output this is) rebuilds them
    broken = unreadable_parquet_files(per_job_results())
    if broken:
        raise WorkflowError(
            "unreadable per-job result files (delete each and rerun: only its job is computed again):\n"
            + "\n".join(f"  rm '{path}'" for path in broken)
        )


def check_ownership():
    """Before any job (main process only): qtraj works only in a results folder it created (qtraj.ownership), and
    stops naming any file that someone else put into a folder that a job writes whole, since Snakemake deletes
    such a folder with everything in it before it reruns the job. Every directory output must be declared in
    qtraj.ownership.FOLDER_OUTPUTS, so that this check sees it."""
    from fnmatch import fnmatch

    from snakemake.io import is_flagged

    from qtraj.ownership import (
        FOLDER_OUTPUTS,
        OwnershipError,
        check_no_foreign_files,
        claim_results_dir,
        folder_outputs,
        results_dir_problem,
    )

    if not workflow.is_main_process:
        return
    protected = {"the working folder": os.getcwd(), "the workflow's own folder": workflow.basedir}
    problem = results_dir_problem(RESULTS, protected)
    if problem:
        raise WorkflowError(problem)
    models = [folder for source in SOURCES for folder in source.made_folders()]
    declared = {f"{RESULTS}/{pattern}" for pattern in FOLDER_OUTPUTS}
    declared |= {glob for source in SOURCES for glob in source.made_folder_globs()}
    for job_kind in workflow.rules:
        for output in job_kind.output:
            pattern = re.sub(r"\{[^}]*\}", "*", str(output))
            if is_flagged(output, "directory") and not any(fnmatch(pattern, glob) for glob in declared):
                raise WorkflowError(
                    f"directory output {output} of {job_kind.name} is not declared in "
                    "qtraj.ownership.FOLDER_OUTPUTS; declare it there so that foreign files in it "
                    "are found before the rule deletes them"
                )
    try:
        claim_results_dir(RESULTS, create=False)  # created in onstart (claim_results): a dry run writes nothing
        check_no_foreign_files(folder_outputs(RESULTS) + models)
    except OwnershipError as error:
        raise WorkflowError(str(error)) from None


def claim_results():
    """onstart (a real run, not a dry run): create the results folder with qtraj's marker (qtraj.ownership)."""
    from qtraj.ownership import claim_results_dir

    claim_results_dir(RESULTS)


def all_targets():
    check_ownership()
    check_results_readable()
    # derived trajectories (averages, cooldowns) have no figure of their own: they are drawn in their parent's
    # (qtraj.plotting)
    figures = [f"{RESULTS}/figures/{run}.png" for source in SOURCES if not source.derived for run in source.names()]
    figures += [f"{RESULTS}/figures/{name}.png" for name in summary_figures(config)]
    # the headline numbers that report/workflow.rst shows first
    return per_job_results() + [dataset_manifest()] + figures + [f"{RESULTS}/science_check.txt"]
