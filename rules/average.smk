# Weight averaging: LAWA / EMA windows over a trajectory and soups across trajectories, written as ordinary
# checkpoint folders that the quantize and evaluate rules treat like any other.


rule average_checkpoints:
    input:
        sources=averaged_sources,
    output:
        directory(f"{RESULTS}/checkpoints/{{run}}/{{checkpoint}}"),
    log:
        f"{LOGS}/average_checkpoints/{{run}}/{{checkpoint}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/average_checkpoints/{{run}}/{{checkpoint}}.tsv"
    wildcard_constraints:
        run=AVERAGE_PATTERN,
    conda:
        "../envs/qtraj.yaml"
    params:
        weights=averaged_weights,
    script:
        "../scripts/average_checkpoints.py"
