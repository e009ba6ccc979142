rule quantize:
    input:
        checkpoint=f"{RESULTS}/checkpoints/{{run}}/{{checkpoint}}",
        calibration=tokens_file("calibration"),
    output:
        temp(directory(f"{RESULTS}/quantized/{{run}}/{{checkpoint}}/{{quantization}}")),
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
        calibration=data_setting("calibration"),
    script:
        "../scripts/quantize.py"
