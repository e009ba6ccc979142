# Checkpoint folders on disk, read in place: `local` trajectories and every other source of folders
# (qtraj.sources.folder.FolderSource). Each checkpoint gets a folder of links to its weights, configs and tokenizer
# in the results tree (kept: links cost nothing, and a kept folder lets later additions compute only the new jobs);
# nothing is ever written into, or deleted from, the folders themselves.


rule link_local_checkpoint:
    input:
        checkpoint=folder_checkpoint,
        tokenizer=f"{RESULTS}/data/tokenizers/{{run}}",
    output:
        directory(f"{RESULTS}/checkpoints/{{run}}/{{checkpoint}}"),
    log:
        kind_log("link_local_checkpoint"),
    wildcard_constraints:
        run=FOLDER_PATTERN,
    localrule: True
    conda:
        "../envs/qtraj.yaml"
    params:
        info=folder_checkpoint_facts,
        allow_pickle=folder_link_setting("allow_pickle"),
        allow_external_links=folder_link_setting("allow_external_links"),
        # not used by the job (which records the fingerprint it reads): a changed content reruns it
        fingerprint=folder_fingerprint,
    script:
        "../scripts/link_local_checkpoint.py"


rule local_tokenizer:
    input:
        folder_tokenizer,
    output:
        directory(f"{RESULTS}/data/tokenizers/{{run}}"),
    log:
        f"{LOGS}/local_tokenizer/{{run}}.log",
    wildcard_constraints:
        run=FOLDER_PATTERN,
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
        run=FOLDER_PATTERN,
        split="|".join(MEASURED_SPLITS),
    conda:
        "../envs/qtraj.yaml"
    params:
        max_tokens_per_char=tokens_per_char_limit,
    script:
        "../scripts/tokenize_split.py"
