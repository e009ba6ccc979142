rule evaluate_fp:
    input:
        checkpoint=f"{RESULTS}/checkpoints/{{run}}/{{checkpoint}}",
        validation=tokens_file("validation"),
        tasks=lambda wildcards: task_files(wildcards).values(),
        lm_eval_tasks=lm_eval_marker,
    output:
        result=f"{RESULTS}/evals/fp/{{run}}/{{checkpoint}}.parquet",
        accuracy=f"{RESULTS}/evals/accuracy/fp/{{run}}/{{checkpoint}}.parquet",
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


rule evaluate_quantized:
    input:
        model=quantized_model,
        checkpoint=f"{RESULTS}/checkpoints/{{run}}/{{checkpoint}}",
        fp_eval=f"{RESULTS}/evals/fp/{{run}}/{{checkpoint}}.parquet",
        validation=tokens_file("validation"),
        calibration=tokens_file("calibration"),
        tasks=lambda wildcards: task_files(wildcards).values(),
        lm_eval_tasks=lm_eval_marker,
    output:
        result=f"{RESULTS}/evals/quantized/{{run}}/{{checkpoint}}/{{quantization}}.parquet",
        layer_errors=f"{RESULTS}/evals/layers/{{run}}/{{checkpoint}}/{{quantization}}.parquet",
        accuracy=f"{RESULTS}/evals/accuracy/quantized/{{run}}/{{checkpoint}}/{{quantization}}.parquet",
    log:
        f"{LOGS}/evaluate_quantized/{{run}}/{{checkpoint}}/{{quantization}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_quantized/{{run}}/{{checkpoint}}/{{quantization}}.tsv"
    conda:
        "../envs/qtraj.yaml"
    threads: config["threads"]["evaluate"]
    resources:
        gpu=resource("evaluate_quantized", "gpu"),
        cpus_per_gpu=resource("evaluate_quantized", "cpus_per_gpu"),
        tasks_per_gpu=resource("evaluate_quantized", "tasks_per_gpu"),
        mem_mb=resource("evaluate_quantized", "mem_mb"),
        runtime=resource("evaluate_quantized", "runtime"),
    params:
        spec=lambda wildcards: quant_spec(config, wildcards.quantization),
        layer_error_rows=config["layer_errors"]["max_rows"],
        evaluation=data_setting("evaluation"),
        calibration=data_setting("calibration"),
        accuracy=data_setting("accuracy"),
        task_files=task_files,
    script:
        "../scripts/evaluate_quantized.py"


rule sharpness:
    input:
        checkpoint=f"{RESULTS}/checkpoints/{{run}}/{{checkpoint}}",
        validation=tokens_file("validation"),
    output:
        f"{RESULTS}/evals/sharpness/{{run}}/{{checkpoint}}.parquet",
    log:
        f"{LOGS}/sharpness/{{run}}/{{checkpoint}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sharpness/{{run}}/{{checkpoint}}.tsv"
    conda:
        "../envs/qtraj.yaml"
    threads: config["threads"]["evaluate"]
    resources:
        gpu=resource("evaluate_quantized", "gpu"),
        cpus_per_gpu=resource("evaluate_quantized", "cpus_per_gpu"),
        tasks_per_gpu=resource("evaluate_quantized", "tasks_per_gpu"),
        mem_mb=resource("evaluate_quantized", "mem_mb"),
        runtime=resource("evaluate_quantized", "runtime"),
    params:
        settings=config["sharpness"],
    script:
        "../scripts/sharpness.py"
