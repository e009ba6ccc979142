# One job per (checkpoint, quantization): quantize in memory and evaluate the quantized model in the same
# process (loss, per-layer errors, accuracy). No quantized model is written unless `packed_models` asks for it.
rule quantize:
    input:
        checkpoint=f"{RESULTS}/checkpoints/{{run}}/{{checkpoint}}",
        fp_eval=kind_outputs("evaluate_fp")["result"],
        validation=tokens_file("validation"),
        calibration=tokens_file("calibration"),
        tasks=lambda wildcards: task_files(wildcards).values(),
        lm_eval_tasks=lm_eval_marker,
    output:
        **packed_model_output(),
        **kind_outputs("quantize"),
    log:
        kind_log("quantize"),
    benchmark:
        f"{RESULTS}/benchmarks/quantize/{{run}}/{{checkpoint}}/{{quantization}}.tsv"
    conda:
        "../envs/qtraj.yaml"
    threads: config["threads"]["quantize"]
    resources:
        **kind_resources("quantize"),
    params:
        spec=lambda wildcards: quant_spec(config, wildcards.quantization),
        layer_error_rows=config["layer_errors"]["max_rows"],
        evaluation=data_setting("evaluation"),
        calibration=data_setting("calibration"),
        accuracy=data_setting("accuracy"),
        task_files=task_files,
    script:
        "../scripts/quantize.py"
