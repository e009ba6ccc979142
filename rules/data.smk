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
