# Weight averaging: LAWA / EMA windows over a trajectory and soups across trajectories, written as ordinary
# checkpoint folders that the quantize and evaluate rules treat like any other.


rule average_checkpoints:
    input:
        sources=averaged_sources,
    output:
        directory(f"{RESULTS}/checkpoints/{{run}}/{{checkpoint}}"),
    log:
        kind_log("average_checkpoints"),
    benchmark:
        f"{RESULTS}/benchmarks/average_checkpoints/{{run}}/{{checkpoint}}.tsv"
    wildcard_constraints:
        run=trajectories_of("averages"),
    conda:
        "../envs/qtraj.yaml"
    params:
        weights=averaged_weights,
    script:
        "../scripts/average_checkpoints.py"
