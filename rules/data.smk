rule split_corpus:
    input:
        corpus=config["corpus"]["path"],
    output:
        train=f"{RESULTS}/data/splits/train.jsonl",
        validation=f"{RESULTS}/data/splits/validation.jsonl",
        calibration=f"{RESULTS}/data/splits/calibration.jsonl",
    log:
        f"{LOGS}/split_corpus.log",
    benchmark:
        f"{RESULTS}/benchmarks/split_corpus.tsv"
    conda:
        "../envs/qtraj.yaml"
    params:
        validation_fraction=config["corpus"]["validation_fraction"],
        calibration_fraction=config["corpus"]["calibration_fraction"],
    script:
        "../scripts/split_corpus.py"


rule train_tokenizer:
    input:
        train=f"{RESULTS}/data/splits/train.jsonl",
    output:
        directory(f"{RESULTS}/data/tokenizer"),
    log:
        f"{LOGS}/train_tokenizer.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_tokenizer.tsv"
    conda:
        "../envs/qtraj.yaml"
    params:
        vocab_size=config["tokenizer"]["vocab_size"],
    script:
        "../scripts/train_tokenizer.py"


rule tokenize_split:
    input:
        split=f"{RESULTS}/data/splits/{{split}}.jsonl",
        tokenizer=f"{RESULTS}/data/tokenizer",
    output:
        f"{RESULTS}/data/tokens/{{split}}.npy",
    log:
        f"{LOGS}/tokenize_split/{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/tokenize_split/{{split}}.tsv"
    conda:
        "../envs/qtraj.yaml"
    script:
        "../scripts/tokenize_split.py"


# A local accuracy task (config `accuracy.local_tasks`), written once per validation text and read by every
# evaluation of the trajectories on that text.
rule build_task:
    input:
        lambda wildcards: validation_text_file(wildcards.text),
    output:
        f"{RESULTS}/data/tasks/{{text}}/{{task}}.jsonl",
    log:
        f"{LOGS}/build_task/{{text}}/{{task}}.log",
    wildcard_constraints:
        text="corpus|hub",
    localrule: True
    conda:
        "../envs/qtraj.yaml"
    params:
        settings=local_task_settings,
    script:
        "../scripts/build_task.py"


# Registered lm-eval tasks (config `accuracy.lm_eval_tasks`): loaded once on the submit host, which has network
# where compute nodes often do not; their datasets stay in the Hugging Face cache for the evaluation jobs.
rule fetch_lm_eval_tasks:
    output:
        f"{RESULTS}/data/tasks/{{text}}/lm_eval.json",
    log:
        f"{LOGS}/fetch_lm_eval_tasks/{{text}}.log",
    wildcard_constraints:
        text="corpus|hub",
    localrule: True
    conda:
        "../envs/qtraj.yaml"
    params:
        tasks=lambda wildcards: (config["hub_data"] if wildcards.text == "hub" else config)["accuracy"]["lm_eval_tasks"],
    script:
        "../scripts/fetch_lm_eval_tasks.py"
