rule evaluate_fp:
    input:
        checkpoint=f"{RESULTS}/checkpoints/{{run}}/{{checkpoint}}",
        validation=tokens_file("validation"),
        tasks=lambda wildcards: task_files(wildcards).values(),
        lm_eval_tasks=lm_eval_marker,
    output:
        result=result_file("fp_evals"),
        accuracy=result_file("accuracy", 0),
    log:
        f"{LOGS}/evaluate_fp/{{run}}/{{checkpoint}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_fp/{{run}}/{{checkpoint}}.tsv"
    conda:
        "../envs/qtraj.yaml"
    threads: config["threads"]["evaluate"]
    resources:
        gpu=resource("evaluate_fp", "gpu"),
        cpus_per_gpu=resource("evaluate_fp", "cpus_per_gpu"),
        tasks_per_gpu=resource("evaluate_fp", "tasks_per_gpu"),
        mem_mb=resource("evaluate_fp", "mem_mb"),
        runtime=resource("evaluate_fp", "runtime"),
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
        result_file("sharpness"),
    log:
        f"{LOGS}/sharpness/{{run}}/{{checkpoint}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sharpness/{{run}}/{{checkpoint}}.tsv"
    conda:
        "../envs/qtraj.yaml"
    threads: config["threads"]["evaluate"]
    resources:
        gpu=resource("sharpness", "gpu"),
        cpus_per_gpu=resource("sharpness", "cpus_per_gpu"),
        tasks_per_gpu=resource("sharpness", "tasks_per_gpu"),
        mem_mb=resource("sharpness", "mem_mb"),
        runtime=resource("sharpness", "runtime"),
    params:
        settings=config["sharpness"],
    script:
        "../scripts/sharpness.py"
