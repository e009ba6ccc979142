rule evaluate_fp:
    input:
        checkpoint=f"{RESULTS}/checkpoints/{{run}}/{{checkpoint}}",
        validation=tokens_file("validation"),
        tasks=lambda wildcards: task_files(wildcards).values(),
        lm_eval_tasks=lm_eval_marker,
    output:
        **kind_outputs("evaluate_fp"),
    log:
        kind_log("evaluate_fp"),
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_fp/{{run}}/{{checkpoint}}.tsv"
    conda:
        "../envs/qtraj.yaml"
    threads: config["threads"]["evaluate"]
    resources:
        **kind_resources("evaluate_fp"),
    params:
        evaluation=data_setting("evaluation"),
        accuracy=data_setting("accuracy"),
        task_files=task_files,
    script:
        "../scripts/evaluate_fp.py"


rule sharpness:
    input:
        checkpoint=f"{RESULTS}/checkpoints/{{run}}/{{checkpoint}}",
        validation=tokens_file("validation"),
    output:
        **kind_outputs("sharpness"),
    log:
        kind_log("sharpness"),
    benchmark:
        f"{RESULTS}/benchmarks/sharpness/{{run}}/{{checkpoint}}.tsv"
    conda:
        "../envs/qtraj.yaml"
    threads: config["threads"]["evaluate"]
    resources:
        **kind_resources("sharpness"),
    params:
        settings=config["sharpness"],
    script:
        "../scripts/sharpness.py"
