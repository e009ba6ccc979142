rule quantize:
    input:
        checkpoint=f"{RESULTS}/checkpoints/{{run}}/{{checkpoint}}",
        calibration=f"{RESULTS}/data/tokens/calibration.npy",
    output:
        temp(directory(f"{RESULTS}/quantized/{{run}}/{{checkpoint}}/{{quantization}}")),
    log:
        f"{LOGS}/quantize/{{run}}/{{checkpoint}}/{{quantization}}.log",
    params:
        spec=lambda wildcards: quant_spec(config, wildcards.quantization),
        calibration=config["calibration"],
    threads: config["threads"]["quantize"]
    script:
        "../scripts/quantize.py"
