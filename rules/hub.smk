# Hub families: checkpoints, tokenizers and evaluation text come from the Hugging Face hub. Downloads are
# local rules (compute nodes often have no internet); checkpoint folders are temp() unless
# hub_data.keep_checkpoints, so a revision's weights are deleted as soon as its jobs are done.


rule download_checkpoint:
    input:
        tokenizer=f"{RESULTS}/data/tokenizers/{{run}}",
    output:
        downloaded_checkpoint(f"{RESULTS}/checkpoints/{{run}}/{{checkpoint}}"),
    log:
        kind_log("download_checkpoint"),
    wildcard_constraints:
        run=trajectories_of("families"),
    localrule: True
    conda:
        "../envs/qtraj.yaml"
    params:
        source=family_download,
    script:
        "../scripts/download_checkpoint.py"


rule download_text:
    output:
        f"{RESULTS}/data/hub/{{split}}.jsonl",
    log:
        f"{LOGS}/download_text/{{split}}.log",
    wildcard_constraints:
        split="|".join(MEASURED_SPLITS),
    localrule: True
    conda:
        "../envs/qtraj.yaml"
    params:
        source=lambda wildcards: config["hub_data"][f"{wildcards.split}_text"],
    script:
        "../scripts/download_text.py"


rule download_tokenizer:
    output:
        directory(f"{RESULTS}/data/tokenizers/{{run}}"),
    log:
        f"{LOGS}/download_tokenizer/{{run}}.log",
    wildcard_constraints:
        run=trajectories_of("families"),
    localrule: True
    conda:
        "../envs/qtraj.yaml"
    params:
        source=family_tokenizer,
    script:
        "../scripts/download_tokenizer.py"


rule tokenize_family_split:
    input:
        split=f"{RESULTS}/data/hub/{{split}}.jsonl",
        tokenizer=f"{RESULTS}/data/tokenizers/{{run}}",
    output:
        f"{RESULTS}/data/tokens/{{run}}/{{split}}.npy",
    log:
        f"{LOGS}/tokenize_family_split/{{run}}/{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/tokenize_family_split/{{run}}/{{split}}.tsv"
    wildcard_constraints:
        run=trajectories_of("families"),
        split="|".join(MEASURED_SPLITS),
    conda:
        "../envs/qtraj.yaml"
    params:
        max_tokens_per_char=tokens_per_char_limit,
    script:
        "../scripts/tokenize_split.py"
