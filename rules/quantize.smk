# One job per (checkpoint, quantization): quantize in memory and evaluate the quantized model in the same
# process (loss, per-layer errors, accuracy). No quantized model is written unless `packed_models` asks for it.
rule quantize:
    input:
        checkpoint=f"{RESULTS}/checkpoints/{{run}}/{{checkpoint}}",
        fp_eval=result_file("fp_evals"),
        validation=tokens_file("validation"),
        calibration=tokens_file("calibration"),
        tasks=lambda wildcards: task_files(wildcards).values(),
        lm_eval_tasks=lm_eval_marker,
    output:
        **packed_model_output(),
        result=result_file("results"),
        layer_errors=result_file("layer_errors"),
        accuracy=result_file("accuracy", 1),
    log:
        f"{LOGS}/quantize/{{run}}/{{checkpoint}}/{{quantization}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/quantize/{{run}}/{{checkpoint}}/{{quantization}}.tsv"
    conda:
        "../envs/qtraj.yaml"
    threads: config["threads"]["quantize"]
    resources:
        gpu=resource("quantize", "gpu"),
        cpus_per_gpu=resource("quantize", "cpus_per_gpu"),
        tasks_per_gpu=resource("quantize", "tasks_per_gpu"),
        mem_mb=resource("quantize", "mem_mb"),
        runtime=resource("quantize", "runtime"),
    params:
        spec=lambda wildcards: quant_spec(config, wildcards.quantization),
        layer_error_rows=config["layer_errors"]["max_rows"],
        evaluation=data_setting("evaluation"),
        calibration=data_setting("calibration"),
        accuracy=data_setting("accuracy"),
        task_files=task_files,
    script:
        "../scripts/quantize.py"
